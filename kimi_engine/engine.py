"""Engine: a loaded model plus what runs it (caches, prefill and decode)."""

from __future__ import annotations

from pathlib import Path

import torch

from .cache import LatentCache
from .checkpoint import load_model
from .config import ModelConfig
from .model import Transformer


class Engine:
    """A model ready to run. Build it with `kimi_engine.load`.

    Attributes: config (ModelConfig), model (Transformer), tokenizer (None when the checkpoint
    directory has no tokenizer files), device, dtype, max_seq_len, max_batch_size.
    """

    def __init__(self, model: Transformer, config: ModelConfig, tokenizer=None, *, max_seq_len: int,
                 max_batch_size: int):
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size

    @property
    def device(self) -> torch.device:
        return self.model.rope_cos.device

    @property
    def dtype(self) -> torch.dtype:
        return self.model.model.norm.weight.dtype

    def new_cache(self, batch_size: int = 1, max_seq_len: int | None = None) -> LatentCache:
        return LatentCache(self.config, batch_size, max_seq_len or self.max_seq_len, self.device, self.dtype)

    def _tokens(self, token_ids) -> torch.Tensor:
        ids = torch.as_tensor(token_ids, dtype=torch.long).flatten()
        if ids.numel() == 0:
            raise ValueError("token_ids is empty")
        if ids.numel() > self.max_seq_len:
            raise ValueError(f"token_ids has {ids.numel()} tokens; max_seq_len is {self.max_seq_len}")
        if ids.min() < 0 or ids.max() >= self.config.vocab_size:
            raise ValueError(f"token_ids must lie in [0, vocab_size={self.config.vocab_size})")
        return ids.to(self.device)

    @torch.inference_mode()
    def logits(self, token_ids) -> torch.Tensor:
        """float32 [len(token_ids), vocab]: every position's next-token logits, from one prefill on a fresh cache."""
        ids = self._tokens(token_ids)
        cache = self.new_cache(1, ids.numel())
        return self.model(ids[None], 0, cache)[0].float()

    @torch.inference_mode()
    def greedy(self, token_ids, max_new_tokens: int) -> list[int]:
        """Greedy continuation of one prompt: prefill once, then one cached decode step per token.

        Stops early at an eos token of the config. Returns only the new token ids.
        """
        ids = self._tokens(token_ids)
        if max_new_tokens < 0 or ids.numel() + max_new_tokens > self.max_seq_len:
            raise ValueError(f"max_new_tokens={max_new_tokens} does not fit max_seq_len={self.max_seq_len}")
        cache = self.new_cache(1, ids.numel() + max_new_tokens)
        logits = self.model(ids[None], 0, cache, last_only=True)         # [1, 1, vocab]
        pos, out = ids.numel(), []
        eos = set(self.config.eos_token_ids)
        for _ in range(max_new_tokens):
            token = int(logits[0, -1].argmax())
            out.append(token)
            if token in eos or len(out) == max_new_tokens:
                break
            logits = self.model(torch.tensor([[token]], device=self.device), pos, cache)
            pos += 1
        return out


def load(path: str | Path | None = None, device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16,
         max_seq_len: int | None = None, max_batch_size: int = 8, progress: bool = True) -> Engine:
    """Load a checkpoint directory (see checkpoint.py) into an Engine.

    device: default CUDA when available, else CPU. max_seq_len: the longest sequence a cache holds
    (default: the config's max_position_embeddings).
    """
    if path is None:
        raise ValueError("load(path=None) needs the built-in demo model, which this build does not ship yet; "
                         "pass a checkpoint directory")
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    model, config = load_model(path, device=device, dtype=dtype, progress=progress)
    max_seq_len = max_seq_len or config.max_position_embeddings
    if not 0 < max_seq_len <= config.max_position_embeddings:
        raise ValueError(f"max_seq_len={max_seq_len} must lie in [1, max_position_embeddings={config.max_position_embeddings}]")
    return Engine(model, config, None, max_seq_len=max_seq_len, max_batch_size=max_batch_size)
