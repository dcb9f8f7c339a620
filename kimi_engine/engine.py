"""Engine: a loaded model plus what runs it (caches, prefill and decode)."""

from __future__ import annotations

from pathlib import Path

import torch

from .cache import LatentCache
from .checkpoint import load_model
from .config import ModelConfig
from .model import Transformer
from .tokenizer import load_tokenizer


class Engine:
    """A model ready to run. Build it with `kimi_engine.load`.

    Attributes: config (ModelConfig), model (Transformer), tokenizer (None when the checkpoint
    directory has no tokenizer files), device, dtype, max_seq_len, max_batch_size, prefill_chunk
    (prompts are prefilled this many tokens at a time, so no [S, S] scores are built for long ones).
    """

    def __init__(self, model: Transformer, config: ModelConfig, tokenizer=None, *, max_seq_len: int,
                 max_batch_size: int, prefill_chunk: int = 2048, kv_fp8: bool = False):
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size
        self.prefill_chunk, self.kv_fp8 = prefill_chunk, kv_fp8

    @property
    def device(self) -> torch.device:
        return self.model.rope_cos.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.norm.weight.dtype

    def new_cache(self, **kwargs) -> LatentCache:
        """An empty paged latent cache for this model (kwargs: block_size, fp8, max_tokens)."""
        kwargs.setdefault("fp8", self.kv_fp8)
        return LatentCache(self.config, self.device, self.dtype, **kwargs)

    def _tokens(self, token_ids, already: int = 0) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("token_ids is empty")
        if already + ids.numel() > self.max_seq_len:
            raise ValueError(f"{already} cached + {ids.numel()} new tokens exceed max_seq_len={self.max_seq_len}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token_ids must lie in [0, vocab_size={self.config.vocab_size})")
        return ids.to(self.device)

    @torch.inference_mode()
    def prefill(self, cache: LatentCache, seq: int, token_ids, all_logits: bool = False) -> torch.Tensor:
        """Append token_ids to sequence `seq` of `cache`, `prefill_chunk` tokens per forward pass, each
        chunk attending to the cache and causally to itself. Works for a new sequence and for
        appending to an existing one. Returns the last position's logits [vocab] (all positions'
        [len(token_ids), vocab] with all_logits), float32."""
        ids = self._tokens(token_ids, cache.length(seq))
        out = []
        for chunk in ids.split(self.prefill_chunk):
            logits = self.model(chunk[None], cache.prepare([seq], chunk.numel()), cache, last_only=not all_logits)
            out.append(logits[0].float())
        return torch.cat(out) if all_logits else out[-1][-1]

    @torch.inference_mode()
    def decode_step(self, cache: LatentCache, seq_ids: list[int], tokens) -> torch.Tensor:
        """One new token for each sequence (any lengths) -> next-token logits [len(seq_ids), vocab] float32."""
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
        return self.model(tokens, cache.prepare(seq_ids, 1), cache)[:, -1].float()

    def logits(self, token_ids) -> torch.Tensor:
        """float32 [len(token_ids), vocab]: every position's next-token logits, from a prefill on a fresh cache."""
        cache = self.new_cache()
        return self.prefill(cache, cache.add_sequence(), token_ids, all_logits=True)

    def greedy(self, token_ids, max_new_tokens: int) -> list[int]:
        """Greedy continuation of one prompt: prefill once, then one cached decode step per token.

        Stops early at an eos token of the config. Returns only the new token ids.
        """
        n = len(token_ids)
        if max_new_tokens < 0 or n + max_new_tokens > self.max_seq_len:
            raise ValueError(f"max_new_tokens={max_new_tokens} does not fit max_seq_len={self.max_seq_len}")
        cache = self.new_cache()
        seq = cache.add_sequence()
        logits, out = self.prefill(cache, seq, token_ids), []
        eos = set(self.config.eos_token_ids)
        while len(out) < max_new_tokens:
            out.append(int(logits.argmax()))
            if out[-1] in eos or len(out) == max_new_tokens:
                break
            logits = self.decode_step(cache, [seq], [out[-1]])[0]
        return out


def load(path: str | Path | None = None, device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16,
         max_seq_len: int | None = None, max_batch_size: int = 8, progress: bool = True,
         prefill_chunk: int = 2048, kv_fp8: bool = False) -> Engine:
    """Load a checkpoint directory (see checkpoint.py) into an Engine.

    device: default CUDA when available, else CPU. max_seq_len: the longest sequence a cache holds
    (default: the config's max_position_embeddings); the cache itself grows with use.
    prefill_chunk: tokens per prefill forward pass. kv_fp8: store the latent cache as fp8 (e4m3).
    """
    if prefill_chunk <= 0:
        raise ValueError(f"prefill_chunk={prefill_chunk} must be positive")
    if path is None:
        raise ValueError("load(path=None) needs the built-in demo model, which this build does not ship yet; "
                         "pass a checkpoint directory")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    tokenizer = load_tokenizer(path)  # first: a broken tokenizer file fails before any weights load
    model, config = load_model(path, device=device, dtype=dtype, progress=progress)
    max_seq_len = max_seq_len or config.max_position_embeddings
    if not 0 < max_seq_len <= config.max_position_embeddings:
        raise ValueError(f"max_seq_len={max_seq_len} must lie in [1, max_position_embeddings={config.max_position_embeddings}]")
    return Engine(model, config, tokenizer, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                  prefill_chunk=prefill_chunk, kv_fp8=kv_fp8)
