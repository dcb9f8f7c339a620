"""Sampling: repetition penalty, temperature, top-k, top-p, min-p, then one draw per row.

The draw uses the exponential-race form of the Gumbel trick: argmax(p / E) with E ~ Exp(1) picks
index i with probability p_i, and needs neither a host sync nor torch.multinomial. Each row draws
its noise from its own torch.Generator, so a seeded request yields the same tokens alone or inside
any batch.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SamplingParams:
    """temperature 0 is greedy. top_k 0, top_p 1, min_p 0 and repetition_penalty 1 are off."""
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0
    min_p: float = 0.0
    repetition_penalty: float = 1.0

    def __post_init__(self):
        def bad(name, rule):
            raise ValueError(f"{name}={getattr(self, name)!r}: {rule}")
        for name in ("temperature", "top_p", "min_p", "repetition_penalty"):
            value = getattr(self, name)
            if not isinstance(value, (int, float)) or isinstance(value, bool) or not math.isfinite(value):
                bad(name, "must be a finite number")
        if self.temperature < 0:
            bad("temperature", "must be >= 0 (0 is greedy)")
        if not 0 < self.top_p <= 1:
            bad("top_p", "must lie in (0, 1]")
        if not isinstance(self.top_k, int) or isinstance(self.top_k, bool) or self.top_k < 0:
            bad("top_k", "must be an integer >= 0 (0 is off)")
        if not 0 <= self.min_p <= 1:
            bad("min_p", "must lie in [0, 1]")
        if self.repetition_penalty <= 0:
            bad("repetition_penalty", "must be > 0 (1 is off)")

    @property
    def greedy(self) -> bool:
        return self.temperature == 0


def apply_repetition_penalty(logits: torch.Tensor, seen: torch.Tensor, penalty: float) -> torch.Tensor:
    """CTRL's penalty on tokens already in the sequence (seen [B, V] bool): positive logits are
    divided by it, negative ones multiplied, so a seen token always becomes less likely."""
    if penalty == 1.0:
        return logits
    penalized = torch.where(logits > 0, logits / penalty, logits * penalty)
    return torch.where(seen, penalized, logits)


def filter_logits(logits: torch.Tensor, params: SamplingParams) -> torch.Tensor:
    """logits [B, V] float32 -> temperature-scaled logits with the tokens top-k/top-p/min-p exclude at -inf."""
    logits = logits / params.temperature
    if params.top_k and params.top_k < logits.shape[-1]:
        kth = logits.topk(params.top_k, dim=-1).values[:, -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    if params.top_p < 1.0:
        sorted_logits, order = logits.sort(dim=-1, descending=True)
        probs = sorted_logits.softmax(-1)
        # Drop a token when the tokens before it already cover top_p (the first always stays).
        drop = probs.cumsum(-1) - probs >= params.top_p
        logits = logits.scatter(-1, order, sorted_logits.masked_fill(drop, float("-inf")))
    if params.min_p > 0.0:
        probs = logits.softmax(-1)
        logits = logits.masked_fill(probs < params.min_p * probs.amax(-1, keepdim=True), float("-inf"))
    return logits


def sample(logits: torch.Tensor, params: SamplingParams, generators: list[torch.Generator],
           seen: torch.Tensor | None = None) -> torch.Tensor:
    """Next tokens [B] (long, on logits' device) from logits [B, V]; row b draws from generators[b].

    seen [B, V] bool marks each row's tokens so far, for the repetition penalty.
    """
    logits = logits.float()
    if seen is not None:
        logits = apply_repetition_penalty(logits, seen, params.repetition_penalty)
    if params.greedy:
        return logits.argmax(-1)
    probs = filter_logits(logits, params).softmax(-1)
    noise = torch.empty_like(probs)
    for row, g in enumerate(generators):
        noise[row].exponential_(generator=g)
    return (probs / noise).argmax(-1)


def make_generator(device: torch.device, seed: int | None) -> torch.Generator:
    """A generator for one sampling path; seed None draws a fresh seed from torch's global RNG."""
    if seed is None:
        seed = int(torch.randint(0, 2**62, (1,)))
    if not isinstance(seed, int) or isinstance(seed, bool):
        raise ValueError(f"seed={seed!r}: must be an integer or None")
    return torch.Generator(device=device).manual_seed(seed)
