"""What a caller submits (Request) and gets back (Delta while streaming, Completion at the end), and
the text side of one sampling path: detokenization and stop strings."""

from __future__ import annotations

import itertools
from dataclasses import dataclass, field
from typing import Callable

import torch

from .sampling import SamplingParams

LogitsProcessor = Callable[[list[int], torch.Tensor], torch.Tensor]

_ids = itertools.count()


@dataclass
class Request:
    """One prompt and how to continue it. n paths share the prompt's cache blocks ("heavy mode"); path j
    samples with seed + j when seed is set. logprobs: None, or how many top alternatives to report per
    token (0: only the chosen token's). grammar: a runtime.grammar.Grammar constraining every path."""
    prompt_ids: list[int]
    params: SamplingParams = field(default_factory=SamplingParams)
    max_new_tokens: int = 256
    n: int = 1
    seed: int | None = None
    stop: list[str] = field(default_factory=list)
    stop_token_ids: frozenset[int] = frozenset()
    logits_processors: list[LogitsProcessor] = field(default_factory=list)
    logprobs: int | None = None
    grammar: object | None = None
    request_id: str = field(default_factory=lambda: f"req-{next(_ids)}")


@dataclass
class Completion:
    text: str                 # stop strings and the stop token are not part of it
    token_ids: list[int]      # generated ids, the stop token included
    finish_reason: str        # "stop" (eos, stop token, stop string, grammar end) or "length"
    prompt_tokens: int
    cached_tokens: int = 0    # prompt tokens served from the prefix cache (OpenAI's prompt_tokens_details)
    logprobs: list[dict] | None = None

    @property
    def completion_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class Delta:
    """A piece of one path's output while streaming: prompt / sample say which path it belongs to.
    The path's last delta has finish_reason and its whole Completion."""
    prompt: int
    sample: int
    text: str
    token_ids: list[int]
    finish_reason: str | None = None
    logprobs: list[dict] | None = None
    completion: Completion | None = None


class TextStream:
    """The text of one path as tokens arrive: incremental UTF-8-safe detokenization, stop strings
    (the text up to the first one is kept) and the tail held back while streaming, since a stop
    string may still begin in it."""

    def __init__(self, tokenizer, stop: list[str]):
        self.detok = tokenizer.incremental_decoder() if tokenizer is not None else None
        self.stop = stop
        self.hold = max((len(s) for s in stop), default=1) - 1
        self.text, self.emitted = "", 0

    def add(self, token: int) -> bool:
        """Append a token's text; True when a stop string appeared (the text is then cut before it)."""
        if self.detok is None:
            return False
        start = max(0, len(self.text) - self.hold)       # a stop string may begin in the held-back tail
        self.text += self.detok.add(token)
        hits = [i for i in (self.text.find(s, start) for s in self.stop) if i >= 0]
        if hits:
            self.text, self.detok = self.text[:min(hits)], None   # the rest is cut: nothing to flush
        return bool(hits)

    def finish(self) -> None:
        if self.detok is not None:
            self.text += self.detok.flush()              # an unfinished UTF-8 character, as decode() shows it
            self.detok = None

    def take(self, final: bool) -> str:
        """The text not yet streamed (all of it when final; else all but the held-back tail)."""
        end = len(self.text) if final else max(self.emitted, len(self.text) - self.hold)
        piece, self.emitted = self.text[self.emitted:end], end
        return piece
