"""Tensor and expert parallelism over torch.distributed (one process per GPU, as torchrun starts them).

    torchrun --nproc-per-node 8 -m kimi_engine.cli generate "..." --model /models/Kimi-K2-Thinking

Every rank runs every token (the activations are replicated); the weights are split:
  - attention by head: q_b_proj (or q_proj) and kv_b_proj column-split, o_proj row-split (its
    partial sums all-reduced). q_a_proj and kv_a_proj_with_mqa are replicated: they produce the
    latent that all heads share.
  - the latent KV cache is replicated: each rank caches every token's full latent. MLA's latent is
    one vector per token that every head reads (in the absorbed form each head's query is projected
    into the latent space and scored against the same 576 values), so splitting by heads splits
    nothing in the cache; splitting the latent dimension instead would need an all-reduce of the
    [B, S, H, T] scores in every layer. vLLM and SGLang replicate it under tensor parallelism too.
  - the dense MLP and the shared expert: gate/up column-split, down row-split.
  - routed experts by expert: rank r holds experts [r*E/W, (r+1)*E/W) and runs them for every
    token routed to them (the router is replicated, so every rank routes identically). The
    routed partial sums and the shared expert's row-split partial sums are combined by ONE
    all-reduce per MoE layer.
  - embedding and lm_head by vocabulary: each rank embeds the tokens in its range (zeros
    elsewhere, summed by an all-reduce) and computes its slice of the logits (all-gathered).
The modules in model.py build shard-sized parameters from a `Parallel`; checkpoint_layout gives
each rank the slice of every checkpoint tensor it holds, read with safetensors' get_slice, so a
rank never reads another rank's bytes. Without a Parallel (or with world_size 1) nothing here runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from .config import ModelConfig


@dataclass(frozen=True)
class Parallel:
    """This process's place in a tensor/expert-parallel group: rank r of world_size.

    group: the torch.distributed process group (None: the default group). Build one with
    `Parallel.from_env()` under torchrun, or pass rank and world_size of a group you initialized.
    """
    rank: int
    world_size: int
    group: Any = None

    def __post_init__(self):
        if not 0 <= self.rank < self.world_size:
            raise ValueError(f"rank={self.rank} must lie in [0, world_size={self.world_size})")

    @classmethod
    def from_env(cls, backend: str | None = None) -> "Parallel":
        """The group torchrun describes (RANK, WORLD_SIZE, LOCAL_RANK), initialized if it is not yet.

        On a CUDA machine the current device becomes cuda:LOCAL_RANK and the backend NCCL; gloo otherwise.
        """
        if "RANK" not in os.environ or "WORLD_SIZE" not in os.environ:
            raise RuntimeError("RANK and WORLD_SIZE are not set: start this under torchrun "
                               "(or build Parallel(rank, world_size) after init_process_group)")
        cuda = torch.cuda.is_available()
        if cuda:
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", 0)))
        if not dist.is_initialized():
            dist.init_process_group(backend or ("nccl" if cuda else "gloo"))
        return cls(dist.get_rank(), dist.get_world_size())

    def split(self, n: int, what: str) -> int:
        """How many of `n` things each rank holds (ValueError unless world_size divides n)."""
        if n % self.world_size:
            raise ValueError(f"{what}={n} is not divisible by world_size={self.world_size}")
        return n // self.world_size

    def part(self, n: int, what: str) -> slice:
        """This rank's block of `n` things split evenly: [rank * n/W, (rank + 1) * n/W)."""
        size = self.split(n, what)
        return slice(self.rank * size, (self.rank + 1) * size)

    def check(self, config: ModelConfig) -> None:
        """ValueError naming the config key unless every split dimension of `config` divides evenly."""
        splits = {"num_attention_heads": config.num_attention_heads, "vocab_size": config.vocab_size}
        if config.first_k_dense_replace > 0:
            splits["intermediate_size"] = config.intermediate_size
        if config.first_k_dense_replace < config.num_hidden_layers:
            splits["n_routed_experts"] = config.n_routed_experts
            splits["moe_intermediate_size * n_shared_experts"] = config.moe_intermediate_size * config.n_shared_experts
        for what, n in splits.items():
            if n % self.world_size:
                raise ValueError(f"{what}={n} is not divisible by world_size={self.world_size}: "
                                 "heads, vocabulary, MLP widths and experts are split evenly across ranks")

    # Collectives. Inference only: they do not carry gradients.
    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """The sum of `x` over ranks (in place, in x's dtype)."""
        dist.all_reduce(x, group=self.group)
        return x

    def shared_seed(self, device: torch.device) -> int:
        """A fresh random seed, rank 0's on every rank. Sampling must pick the same tokens everywhere:
        a rank that drew other tokens would feed them to the same collectives (wrong sums, or a hang
        when it stops first)."""
        seed = torch.randint(0, 2**62, (1,)).to(device)
        dist.broadcast(seed, src=self._first_rank(), group=self.group)
        return int(seed)

    def broadcast_object(self, obj: Any) -> Any:
        """Rank 0's `obj` (picklable) on every rank; the others' `obj` is ignored."""
        box = [obj]
        dist.broadcast_object_list(box, src=self._first_rank(), group=self.group)
        return box[0]

    def _first_rank(self) -> int:
        """The global rank of this group's rank 0 (collectives name their source globally)."""
        return 0 if self.group is None else dist.get_global_rank(self.group, 0)

    def all_gather(self, x: torch.Tensor) -> torch.Tensor:
        """Every rank's `x` [..., n] concatenated in rank order along the last dim -> [..., n * world_size]."""
        parts = [torch.empty_like(x) for _ in range(self.world_size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        return torch.cat(parts, dim=-1)
