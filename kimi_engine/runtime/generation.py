"""The generation loop: continuous batching over the paged latent cache.

Requests wait in a queue; each is admitted when the batch has room for its n sampling paths: its
prompt is prefilled once (chunked), the cache sequence is forked n - 1 times, and every path
samples its first token from the same logits with its own generator. Then all running paths
decode together, one token per step; a path that finishes frees its slot (and its cache blocks)
at once, and waiting requests take the room.
"""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from .sampling import SamplingParams, make_generator, sample

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]


@dataclass
class Completion:
    text: str                 # stop strings and the stop token are not part of it
    token_ids: list[int]      # generated ids, the stop token included
    finish_reason: str        # "stop" (eos, stop token or stop string) or "length"
    prompt_tokens: int

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Delta:
    """A piece of one path's output while streaming: prompt / sample say which path it belongs to."""
    prompt: int
    sample: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None


@dataclass
class Request:
    """One prompt. With `seq`, the prompt continues a cache sequence that already holds its first
    `cached` tokens (the agent loop's "prefill only what is new")."""
    prompt_ids: list[int]
    seq: int | None = None
    cached: int = 0


@dataclass
class _Path:
    prompt: int
    sample: int
    seq: int
    generator: torch.Generator
    detok: object | None                      # IncrementalDecoder, None without a tokenizer
    budget: int                               # tokens it may still generate
    token_ids: list[int] = field(default_factory=list)
    text: str = ""
    emitted: int = 0                          # characters of text already streamed
    finish_reason: str | None = None
    seen: torch.Tensor | None = None          # [V] bool, for the repetition penalty


class Generation:
    """Iterate to run; yields Delta objects. Everything is validated in __init__, before any work."""

    def __init__(self, engine, requests: list[Request], params: SamplingParams, *, n: int, max_new_tokens: int,
                 seed: int | None, stop: list[str], stop_token_ids: set[int],
                 logits_processors: list[LogitsProcessor] | None, cache, free_finished: bool = True):
        if not isinstance(n, int) or not 1 <= n <= engine.max_batch_size:
            raise ValueError(f"n={n!r}: must be an integer in [1, max_batch_size={engine.max_batch_size}]")
        if not isinstance(max_new_tokens, int) or max_new_tokens < 1:
            raise ValueError(f"max_new_tokens={max_new_tokens!r}: must be an integer >= 1")
        if seed is not None and (not isinstance(seed, int) or isinstance(seed, bool)):
            raise ValueError(f"seed={seed!r}: must be an integer or None")
        if stop and engine.tokenizer is None:
            raise ValueError("stop strings need a tokenizer; this checkpoint has none (use stop_token_ids)")
        for i, r in enumerate(requests):
            new = len(r.prompt_ids) - r.cached
            if not r.prompt_ids:
                raise ValueError(f"prompt {i} is empty")
            if new < 1:
                raise ValueError(f"prompt {i} has no tokens beyond the {r.cached} already cached")
            if len(r.prompt_ids) >= engine.max_seq_len:
                raise ValueError(f"prompt {i} has {len(r.prompt_ids)} tokens; max_seq_len={engine.max_seq_len} "
                                 "leaves no room to generate")
            engine.check_tokens(r.prompt_ids)
        self.engine, self.requests, self.params, self.n = engine, requests, params, n
        self.max_new_tokens, self.seed, self.stop = max_new_tokens, seed, stop
        # Unseeded paths draw fresh seeds from torch's global RNG, except under tensor parallelism: there
        # every rank draws them from one source seeded alike, so all ranks sample the same tokens.
        parallel = engine.model.parallel
        self._seeds = None
        if seed is None and parallel is not None and not params.greedy:
            self._seeds = torch.Generator().manual_seed(parallel.shared_seed(engine.device))
        self.stop_token_ids, self.processors = stop_token_ids, logits_processors or []
        self.cache, self.free_finished = cache, free_finished
        self.paths: list[_Path] = []          # every path ever started, in admission order
        self._hold = max((len(s) for s in stop), default=1) - 1   # streamed text held back for stop strings

    def __iter__(self) -> Iterator[Delta]:
        engine, cache = self.engine, self.cache
        waiting, running = deque(enumerate(self.requests)), []
        while waiting or running:
            while waiting and len(running) + self.n <= engine.max_batch_size:
                index, request = waiting.popleft()
                paths, logits = self._admit(index, request)
                yield from self._advance(paths, logits.expand(len(paths), -1))
                running += [p for p in paths if p.finish_reason is None]
            if running:
                logits = engine.decode_step(cache, [p.seq for p in running], [p.token_ids[-1] for p in running])
                yield from self._advance(running, logits)
                running = [p for p in running if p.finish_reason is None]

    def _path_seed(self, j: int) -> int | None:
        if self.seed is not None:
            return self.seed + j
        if self._seeds is not None:
            return int(torch.randint(0, 2**62, (1,), generator=self._seeds))
        return None   # make_generator draws from the global RNG

    def _admit(self, index: int, request: Request) -> tuple[list[_Path], torch.Tensor]:
        engine, cache = self.engine, self.cache
        seq = cache.add_sequence() if request.seq is None else request.seq
        logits = engine.prefill(cache, seq, request.prompt_ids[request.cached:])[None]     # [1, V]
        seqs = [seq] + [cache.fork(seq) for _ in range(self.n - 1)]
        budget = min(self.max_new_tokens, engine.max_seq_len - len(request.prompt_ids))
        paths = []
        for j, s in enumerate(seqs):
            path = _Path(index, j, s, make_generator(engine.device, self._path_seed(j)),
                         engine.tokenizer.incremental_decoder() if engine.tokenizer else None, budget)
            if self.params.repetition_penalty != 1.0:
                path.seen = torch.zeros(engine.config.vocab_size, dtype=torch.bool, device=engine.device)
                path.seen[torch.tensor(request.prompt_ids, device=engine.device)] = True
            paths.append(path)
        self.paths += paths
        return paths, logits

    def _advance(self, paths: list[_Path], logits: torch.Tensor) -> Iterator[Delta]:
        """Sample one token for each path from logits [len(paths), V] and yield what it adds."""
        if self.processors:
            logits = torch.stack([self._process(p, row) for p, row in zip(paths, logits.float())])
        seen = torch.stack([p.seen for p in paths]) if paths[0].seen is not None else None
        tokens = sample(logits, self.params, [p.generator for p in paths], seen).tolist()
        for path, token in zip(paths, tokens):
            delta = self._push(path, token)
            if path.finish_reason is not None and self.free_finished:
                self.cache.free(path.seq)
            if delta.text or delta.token_ids:
                yield delta

    def _process(self, path: _Path, row: torch.Tensor) -> torch.Tensor:
        for processor in self.processors:
            row = processor(path.token_ids, row)
        return row

    def _push(self, path: _Path, token: int) -> Delta:
        path.token_ids.append(token)
        path.budget -= 1
        if path.seen is not None:
            path.seen[token] = True
        if token in self.stop_token_ids:
            path.finish_reason = "stop"
        elif path.detok is not None:
            start = max(0, len(path.text) - self._hold)   # a stop string may begin in the held-back tail
            path.text += path.detok.add(token)
            hits = [i for i in (path.text.find(s, start) for s in self.stop) if i >= 0]
            if hits:
                path.text, path.finish_reason = path.text[:min(hits)], "stop"
                path.detok = None                     # the rest of the text is cut, nothing to flush
        if path.finish_reason is None and path.budget == 0:
            path.finish_reason = "length"
        if path.finish_reason is not None and path.detok is not None:
            path.text += path.detok.flush()           # an unfinished UTF-8 character, as decode() shows it
        end = len(path.text) if path.finish_reason else max(path.emitted, len(path.text) - self._hold)
        delta = Delta(path.prompt, path.sample, path.text[path.emitted:end], [token], path.finish_reason)
        path.emitted = end
        return delta

    def completions(self) -> list[list[Completion]]:
        """After iterating: completions[prompt][sample]."""
        out = [[None] * self.n for _ in self.requests]
        for p in self.paths:
            out[p.prompt][p.sample] = Completion(p.text, p.token_ids, p.finish_reason,
                                                 len(self.requests[p.prompt].prompt_ids))
        return out
