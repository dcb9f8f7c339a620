"""The MLA latent KV cache, paged.

Per token and layer MLA needs only the normed kv_lora_rank latent and the roped shared key: 576
values for Kimi K2 (70,272 bytes per token over 61 layers in bf16; 18.4 GB for one 256k sequence),
instead of 64 heads x (192 + 128) expanded keys and values.

Memory is taken as sequences grow, in blocks of `block_size` tokens: each layer has a pool
[num_blocks, block_size, C + R], and each sequence a block table listing its blocks in order
(kept by runtime/blocks.py, which also shares blocks between forks and cached prefixes).
Pools are separate per layer so that growing one (allocate larger, copy, free) costs a transient
of 1/num_layers of the cache rather than doubling it.

Optional fp8 (e4m3) storage halves the cache: per token, the latent and the rope key each get a
float32 scale (amax / 448), kept in `kv_scale` [num_blocks, block_size, 2].
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .config import ModelConfig

FP8 = torch.float8_e4m3fn
FP8_MAX = 448.0  # largest finite e4m3 value


@dataclass
class CacheBatch:
    """Where the S new tokens of each of B sequences go, for one forward pass (built by BlockManager.prepare).

    positions [B, S] long: absolute positions of the new tokens; slots [B, S] long: flat slot
    (block * block_size + offset) each is written to; block_table [B, max_blocks] int32 and
    seq_lens [B] int32 (lengths including the new tokens), as the attention kernel reads them.
    max_seq_len: a host-side bound on seq_lens, so the attention kernel can size its split-KV grid
    without reading seq_lens back (a sync); `prepare` gives the longest, CUDA graphs a fixed bound.
    """
    seq_ids: list[int]
    positions: torch.Tensor
    slots: torch.Tensor
    block_table: torch.Tensor
    seq_lens: torch.Tensor
    max_seq_len: int | None = None

    def to(self, device: torch.device | str) -> "CacheBatch":
        if self.positions.device == torch.device(device):
            return self
        return CacheBatch(self.seq_ids, self.positions.to(device), self.slots.to(device),
                          self.block_table.to(device), self.seq_lens.to(device), self.max_seq_len)


class LatentCache:
    """The per-layer latent pools [num_blocks, block_size, C + R] (and fp8 scales). Which blocks belong to
    which sequence is the block manager's business (runtime/blocks.py); the model only writes and reads
    slots through a CacheBatch."""

    def __init__(self, config: ModelConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.bfloat16, block_size: int = 64, fp8: bool = False):
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size={block_size} must be a power of two")
        self.dtype, self.block_size, self.fp8 = dtype, block_size, fp8
        self.kv_lora_rank = config.kv_lora_rank
        self.width = config.kv_lora_rank + config.qk_rope_head_dim
        self.device = torch.device(device or "cpu")
        shape = (0, block_size, self.width)
        self.kv = [torch.empty(shape, dtype=FP8 if fp8 else dtype, device=self.device)
                   for _ in range(config.num_hidden_layers)]
        self.kv_scale = ([torch.empty(0, block_size, 2, device=self.device) for _ in self.kv] if fp8 else None)

    @property
    def num_blocks(self) -> int:
        return self.kv[0].shape[0]

    @property
    def nbytes(self) -> int:
        """Bytes allocated now, over all layers."""
        pools = self.kv + (self.kv_scale or [])
        return sum(t.numel() * t.element_size() for t in pools)

    def bytes_per_token(self) -> int:
        per_layer = self.width * (1 if self.fp8 else self.dtype.itemsize)
        return len(self.kv) * (per_layer + (8 if self.fp8 else 0))

    def grow(self, num_blocks: int) -> None:
        """Reallocate every layer's pool to num_blocks blocks, one layer at a time (the transient is one
        layer's pool, not the whole cache); the blocks held so far keep their contents and indices.
        The pool lists are updated in place: holders of `kv` see the new pools."""
        old = self.num_blocks
        if num_blocks < old:
            raise ValueError(f"grow: {num_blocks} blocks is fewer than the {old} held")
        for pools in (self.kv, self.kv_scale or []):
            for i, pool in enumerate(pools):
                grown = pool.new_zeros((num_blocks,) + tuple(pool.shape[1:]))
                grown[:old] = pool
                pools[i] = grown

    def copy_block(self, src: int, dst: int) -> None:
        """Block dst of every layer becomes a copy of block src (copy-on-write of a shared block)."""
        for pools in (self.kv, self.kv_scale or []):
            for pool in pools:
                pool[dst] = pool[src]

    # ------------------------------------------------------------------------------ data
    def write(self, layer: int, batch: CacheBatch, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        """Store latent [B, S, C] and k_rope [B, S, R] of the new tokens at their slots."""
        values = torch.cat([latent, k_rope], dim=-1).flatten(0, 1)                # [B*S, C+R]
        slots = batch.slots.flatten()
        pool = self.kv[layer].view(-1, self.width)
        if not self.fp8:
            pool[slots] = values.to(pool.dtype)
            return
        parts = values.float().split([self.kv_lora_rank, self.width - self.kv_lora_rank], dim=-1)
        scales = torch.stack([p.abs().amax(-1) for p in parts], dim=-1).clamp_min(1e-12) / FP8_MAX  # [B*S, 2]
        pool[slots] = torch.cat([p / scales[:, i:i + 1] for i, p in enumerate(parts)], dim=-1).to(FP8)
        self.kv_scale[layer].view(-1, 2)[slots] = scales

    def gather(self, layer: int, batch: CacheBatch) -> tuple[torch.Tensor, torch.Tensor]:
        """Every cached token of each sequence, contiguous and in the compute dtype:
        latent [B, T, C], k_rope [B, T, R] with T = the longest seq_len (shorter rows padded)."""
        T = int(batch.seq_lens.max())
        t = torch.arange(T, device=self.device)
        slots = batch.block_table.long().gather(1, (t // self.block_size).expand(len(batch.seq_ids), -1))
        slots = slots * self.block_size + t % self.block_size                      # [B, T]
        values = self.kv[layer].view(-1, self.width)[slots].to(self.dtype)
        if self.fp8:
            scales = self.kv_scale[layer].view(-1, 2)[slots]                        # [B, T, 2]
            values = torch.cat([values[..., : self.kv_lora_rank] * scales[..., :1],
                                values[..., self.kv_lora_rank:] * scales[..., 1:]], dim=-1).to(self.dtype)
        return values[..., : self.kv_lora_rank], values[..., self.kv_lora_rank:]
