"""Engine: a loaded model plus what runs it (caches, prefill and decode)."""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path
from typing import Iterator

import torch

from .. import ops
from .agent import AgentRun, run_agent
from ..cache import LatentCache
from ..chat.parser import THINK_BEGIN, THINK_END, StreamParser, parse_assistant
from ..checkpoint import load_model
from ..config import ModelConfig
from .cuda_graphs import DecodeGraphs, check_not_parallel
from .generation import Delta, Generation, LogitsProcessor, Request
from ..kernels.mla_decode import check_fp8_kv_device
from ..model import Transformer
from .sampling import SamplingParams
from ..chat.tokenizer import load_tokenizer


def aggregation_request(drafts: list[dict]) -> str:
    """Heavy mode's last turn: the n drafts, and the request to combine them into one answer."""
    parts = [f"You wrote {len(drafts)} independent drafts for the last request. Compare them, keep what is "
             "right, fix what is wrong, and write one final answer."]
    for i, d in enumerate(drafts, 1):
        parts.append(f"## Draft {i}\n{d['content'].strip() or '(no answer)'}")
    return "\n\n".join(parts)


@dataclass
class EngineStats:
    """Tokens run through the model since load (or since you reset them): prefilled, and decoded one per step."""
    prefill_tokens: int = 0
    decode_tokens: int = 0


class Engine:
    """A model ready to run. Build it with `kimi_engine.load`.

    Attributes: config (ModelConfig), model (Transformer), tokenizer (None when the checkpoint
    directory has no tokenizer files), device, dtype, max_seq_len, max_batch_size, prefill_chunk
    (prompts are prefilled this many tokens at a time, so no [S, S] scores are built for long ones),
    graphs (the DecodeGraphs that runs decode steps, or None: see cuda_graph.py).
    """

    def __init__(self, model: Transformer, config: ModelConfig, tokenizer=None, *, max_seq_len: int,
                 max_batch_size: int, prefill_chunk: int = 2048, kv_fp8: bool = False, cuda_graphs: bool = False):
        self.model, self.config, self.tokenizer = model, config, tokenizer
        self.max_seq_len, self.max_batch_size = max_seq_len, max_batch_size
        self.prefill_chunk, self.kv_fp8 = prefill_chunk, kv_fp8
        self.stats = EngineStats()
        self.graphs = DecodeGraphs(self) if cuda_graphs else None

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

    def check_tokens(self, token_ids, already: int = 0) -> torch.Tensor:
        """token_ids as a long tensor on the device; ValueError if empty, out of vocabulary or too long."""
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
        ids = self.check_tokens(token_ids, cache.length(seq))
        out = []
        self.stats.prefill_tokens += ids.numel()
        for chunk in ids.split(self.prefill_chunk):
            logits = self.model(chunk[None], cache.prepare([seq], chunk.numel()), cache, last_only=not all_logits)
            out.append(logits[0].float())
        return torch.cat(out) if all_logits else out[-1][-1]

    @torch.inference_mode()
    def decode_step(self, cache: LatentCache, seq_ids: list[int], tokens) -> torch.Tensor:
        """One new token for each sequence (any lengths) -> next-token logits [len(seq_ids), vocab] float32.
        With graphs (load(cuda_graphs=True)) the step replays a captured CUDA graph."""
        self.stats.decode_tokens += len(seq_ids)
        if self.graphs is not None:
            return self.graphs.decode(cache, seq_ids, tokens)
        tokens = torch.as_tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
        return self.model(tokens, cache.prepare(seq_ids, 1), cache)[:, -1].float()

    def logits(self, token_ids) -> torch.Tensor:
        """float32 [len(token_ids), vocab]: every position's next-token logits, from a prefill on a fresh cache."""
        cache = self.new_cache()
        return self.prefill(cache, cache.add_sequence(), token_ids, all_logits=True)

    def greedy(self, token_ids, max_new_tokens: int) -> list[int]:
        """Greedy continuation of one tokenized prompt; only the new ids, an eos id ending them."""
        return self.generate(list(token_ids), max_new_tokens=max_new_tokens, temperature=0.0).token_ids

    def generate(self, prompt, max_new_tokens: int = 256, temperature: float = 1.0, top_p: float = 1.0,
                 top_k: int = 0, min_p: float = 0.0, repetition_penalty: float = 1.0, seed: int | None = None,
                 stop: str | list[str] | None = None, stop_token_ids: list[int] | None = None, n: int = 1,
                 stream: bool = False, logits_processors: list[LogitsProcessor] | None = None):
        """Generate from a prompt (str or list of token ids) or a batch of them (a list of those).

        Returns a Completion (text, token_ids, finish_reason, prompt_tokens, completion_tokens); a list
        of them for a batch or for n > 1 (a list of lists for both). stream=True returns an iterator
        of Delta (prompt, sample, text, token_ids, finish_reason) whose text pieces add up to the
        Completion's text. Generation ends at the eos tokens, stop_token_ids, a stop string (not
        included in the text) or max_new_tokens. seed makes sample j of every prompt use seed + j,
        alone or in any batch. n > 1 prefills the prompt once and forks its cache ("heavy mode").
        More prompts than max_batch_size are queued; each finished path frees its slot at once.
        Raises ValueError on any bad argument before doing any work.
        """
        params = SamplingParams(temperature, top_p, top_k, min_p, repetition_penalty)
        single = isinstance(prompt, str) or (isinstance(prompt, list) and all(isinstance(t, int) for t in prompt))
        prompts = [prompt] if single else list(prompt)
        if not prompts:
            raise ValueError("prompt: an empty batch")
        requests = [Request(self._encode(p, i)) for i, p in enumerate(prompts)]
        stop = [stop] if isinstance(stop, str) else list(stop or [])
        if any(not isinstance(s, str) or not s for s in stop):
            raise ValueError(f"stop={stop!r}: stop strings must be non-empty strings")
        cache = self.new_cache() if self.graphs is None else self.graphs.generation_cache(
            [len(r.prompt_ids) for r in requests], n, max_new_tokens)   # reserved: no re-capture mid-run
        run = Generation(self, requests, params, n=n, max_new_tokens=max_new_tokens, seed=seed, stop=stop,
                         stop_token_ids=self.stop_ids(stop_token_ids), logits_processors=logits_processors,
                         cache=cache)
        if stream:
            return self._stream(run)
        with torch.inference_mode():
            for _ in run:
                pass
        out = run.completions()
        out = [row[0] if n == 1 else row for row in out]
        return out[0] if single else out

    def chat(self, messages: list[dict], tools: list[dict] | None = None, thinking: bool = True, stream: bool = False,
             n: int = 1, aggregate: bool = False, max_new_tokens: int = 4096, **sampling):
        """One assistant turn for OpenAI-format messages (and tool schemas) -> an assistant message
        {"role", "content", "reasoning_content", "tool_calls"}.

        thinking=False closes the reasoning block in the prompt, so the model answers directly.
        stream=True yields {"reasoning_content": ...}, {"content": ...} and {"tool_calls": [...]} deltas
        (each call once complete). n > 1 returns n messages from one prefill ("heavy mode");
        with aggregate=True the model then combines them into one answer, returned with "drafts".
        sampling: generate's arguments (temperature, top_p, top_k, min_p, seed, ...).
        """
        if self.tokenizer is None:
            raise ValueError("chat needs a tokenizer; this checkpoint has none")
        prompt = self._chat_prompt(messages, tools, thinking)
        if stream:
            if n != 1:
                raise ValueError("stream=True takes n=1")
            return self._stream_chat(self.generate(prompt, max_new_tokens, stream=True, **sampling), thinking)
        out = self.generate(prompt, max_new_tokens, n=n, **sampling)
        drafts = [parse_assistant(c.text, thinking) for c in (out if n > 1 else [out])]
        if n == 1:
            return drafts[0]
        if not aggregate:
            return drafts
        combined = self.chat(messages + [{"role": "user", "content": aggregation_request(drafts)}], tools, thinking,
                             max_new_tokens=max_new_tokens, **sampling)
        return {**combined, "drafts": drafts}

    def _chat_prompt(self, messages, tools, thinking: bool) -> list[int]:
        ids = self.tokenizer.apply_chat_template(messages, tools, add_generation_prompt=True)
        if not thinking:  # an empty reasoning block: the model goes straight to the answer
            ids += self.tokenizer.encode(THINK_BEGIN + THINK_END)
        return ids

    @staticmethod
    def _stream_chat(deltas: Iterator[Delta], thinking: bool) -> Iterator[dict]:
        parser = StreamParser(thinking)
        for delta in deltas:
            yield from parser.feed(delta.text)
        yield from parser.close()

    def run_agent(self, messages: list[dict], tools, max_tool_calls: int = 300, on_step=None, **sampling) -> AgentRun:
        """Generate, run the tool calls (Python callables, or OpenAI tool dicts with a "callable"),
        append their results, and repeat until an answer without tool calls or max_tool_calls.

        One KV cache serves the whole conversation: each round prefills only the appended tokens.
        Returns an AgentRun (messages, steps, finish_reason); on_step(step) sees each round.
        """
        return run_agent(self, messages, tools, max_tool_calls, on_step, **sampling)

    @staticmethod
    def _stream(run: Generation) -> Iterator[Delta]:
        with torch.inference_mode():
            yield from run

    def _encode(self, prompt, index: int) -> list[int]:
        if isinstance(prompt, str):
            if self.tokenizer is None:
                raise ValueError("a text prompt needs a tokenizer; this checkpoint has none (pass token ids)")
            return self.tokenizer.encode(prompt)
        if not isinstance(prompt, (list, tuple)) or not all(isinstance(t, int) for t in prompt):
            raise ValueError(f"prompt {index}: expected a str or a list of token ids, got {type(prompt).__name__}")
        return list(prompt)

    def stop_ids(self, extra: list[int] | None = None) -> set[int]:
        """Token ids that end generation: the config's eos ids, the tokenizer's eos and [EOS], and `extra`."""
        ids = set(self.config.eos_token_ids) | set(extra or [])
        if self.tokenizer is not None:
            ids |= {i for i in (self.tokenizer.eos_token_id, self.tokenizer.token_to_id("[EOS]")) if i is not None}
        return ids


def load(path: str | Path | None = None, device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16,
         max_seq_len: int | None = None, max_batch_size: int = 8, progress: bool = True,
         prefill_chunk: int = 2048, kv_fp8: bool = False, parallel=None, cuda_graphs: bool = False) -> Engine:
    """Load a checkpoint directory (see checkpoint.py) into an Engine.

    device: default CUDA when available, else CPU. max_seq_len: the longest sequence a cache holds
    (default: the config's max_position_embeddings); the cache itself grows with use.
    prefill_chunk: tokens per prefill forward pass. kv_fp8: store the latent cache as fp8 (e4m3).
    parallel: a kimi_engine.parallel.Parallel to load this rank's shard of a tensor/expert-parallel
    model (every rank then runs the same calls on the same inputs); None: the whole model here.
    cuda_graphs: decode steps replay CUDA graphs, captured once per batch-size bucket (cuda_graph.py);
    needs the Triton kernels and INT4 experts. Off CUDA the same static-buffer step runs eagerly.
    """
    if prefill_chunk <= 0:
        raise ValueError(f"prefill_chunk={prefill_chunk} must be positive")
    if path is None:  # the built-in demo model, shipped as package data (kimi_engine/demo/)
        from ..demo import demo_path
        path = demo_path()
    device = torch.device(device or ("cuda" if torch.cuda.is_available() else "cpu"))
    # Mistakes that would otherwise surface only after hundreds of GB have loaded:
    if kv_fp8 and ops.kernel_mode() != "torch":
        check_fp8_kv_device(device)
    if cuda_graphs:
        check_not_parallel(parallel)
    if parallel is not None and parallel.world_size > 1:
        local = os.environ.get("LOCAL_RANK")
        if device.type == "cuda" and local is not None:
            index = device.index if device.index is not None else torch.cuda.current_device()
            if index != int(local):
                raise ValueError(f"rank {parallel.rank} would load onto cuda:{index} but LOCAL_RANK={local}: call "
                                 "torch.cuda.set_device(LOCAL_RANK) first (Parallel.from_env does), or pass device=")
    tokenizer = load_tokenizer(path)  # first: a broken tokenizer file fails before any weights load
    model, config = load_model(path, device=device, dtype=dtype, progress=progress, parallel=parallel)
    max_seq_len = max_seq_len or config.max_position_embeddings
    if not 0 < max_seq_len <= config.max_position_embeddings:
        raise ValueError(f"max_seq_len={max_seq_len} must lie in [1, max_position_embeddings={config.max_position_embeddings}]")
    return Engine(model, config, tokenizer, max_seq_len=max_seq_len, max_batch_size=max_batch_size,
                  prefill_chunk=prefill_chunk, kv_fp8=kv_fp8, cuda_graphs=cuda_graphs)
