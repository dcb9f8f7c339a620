"""The runner: the forward passes of one scheduled step over the latent cache. It knows the model, the
pools and the CUDA graphs, nothing of requests.

A step (StepPlan) is a decode batch, one new token for each of B sequences in one forward pass
(absorbed attention; a CUDA graph replay when graphs are on), plus prefill chunks, each a forward
pass of its own (naive attention over the cache: chunks of different lengths are not padded into one
batch). Every position of the plan is already placed in blocks by the block manager.

Under tensor parallelism rank 0 schedules: it broadcasts each plan, and the other ranks (`follow`)
grow their pools to the same size, replay its copy-on-write copies and run the same passes, so their
collectives meet; rank 0 alone samples (the logits are all-gathered, identical on every rank).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from ..cache import CacheBatch, LatentCache
from ..model import Transformer


@dataclass
class Prefill:
    tokens: list[int]
    batch: CacheBatch            # one sequence, len(tokens) positions (host tensors)
    all_logits: bool = False     # every position's logits, not just the last


@dataclass
class StepPlan:
    num_blocks: int                                   # the pools' size for this step
    copies: list[tuple[int, int]] = field(default_factory=list)   # copy-on-write (src, dst), made before the step
    decode_tokens: list[int] = field(default_factory=list)
    decode_batch: CacheBatch | None = None
    prefills: list[Prefill] = field(default_factory=list)
    stop: bool = False                                # followers return from follow() ...
    result: object = None                             # ... with this (rank 0's result of the call)


class Runner:
    """Forward passes for StepPlans. graphs: a DecodeGraphs (cuda_graphs.py) or None."""

    def __init__(self, model: Transformer, pools: LatentCache, graphs=None):
        self.model, self.pools, self.graphs = model, pools, graphs
        self.parallel = model.parallel if model.parallel is not None and model.parallel.world_size > 1 else None

    @property
    def device(self) -> torch.device:
        return self.model.rope_cos.device

    @torch.inference_mode()
    def execute(self, plan: StepPlan) -> tuple[torch.Tensor | None, list[torch.Tensor]]:
        """Run a plan -> (decode logits [B, V] float32 or None, per prefill its logits [V] or [S, V])."""
        if self.parallel is not None and self.parallel.rank == 0:
            self.parallel.broadcast_object(plan)
        return self._run(plan)

    def _run(self, plan: StepPlan):
        decode = None
        if plan.decode_batch is not None:
            decode = self.decode(plan.decode_tokens, plan.decode_batch)
        return decode, [self.prefill(p.tokens, p.batch, p.all_logits) for p in plan.prefills]

    @torch.inference_mode()
    def decode(self, tokens: list[int], batch: CacheBatch) -> torch.Tensor:
        """One new token per sequence -> next-token logits [B, V] float32."""
        if self.graphs is not None:
            return self.graphs.decode(batch, tokens)
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device).view(-1, 1)
        return self.model(ids, batch.to(self.device), self.pools)[:, -1].float()

    @torch.inference_mode()
    def prefill(self, tokens: list[int], batch: CacheBatch, all_logits: bool = False) -> torch.Tensor:
        """S tokens of one sequence -> the last position's logits [V] (every position's [S, V]), float32."""
        ids = torch.tensor(tokens, dtype=torch.long, device=self.device)[None]
        logits = self.model(ids, batch.to(self.device), self.pools, last_only=not all_logits)[0].float()
        return logits if all_logits else logits[-1]

    @torch.inference_mode()
    def follow(self):
        """Ranks other than 0: run rank 0's plans until it stops; returns what it sent with the stop."""
        if self.parallel is None or self.parallel.rank == 0:
            raise RuntimeError("follow() is for ranks other than 0 of a tensor-parallel engine")
        while True:
            plan: StepPlan = self.parallel.broadcast_object(None)
            if plan.stop:
                return plan.result
            if plan.num_blocks > self.pools.num_blocks:
                self.pools.grow(plan.num_blocks)
            for src, dst in plan.copies:
                self.pools.copy_block(src, dst)
            self._run(plan)

    def stop_followers(self, result=None) -> None:
        """Rank 0: end the other ranks' follow(), handing them `result` (picklable)."""
        if self.parallel is not None and self.parallel.rank == 0:
            self.parallel.broadcast_object(StepPlan(self.pools.num_blocks, stop=True, result=result))
