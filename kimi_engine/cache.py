"""The MLA latent KV cache, paged.

Per token and layer MLA needs only the normed kv_lora_rank latent and the roped shared key: 576
values for Kimi K2 (70,272 bytes per token over 61 layers in bf16; 18.4 GB for one 256k sequence),
instead of 64 heads x (192 + 128) expanded keys and values.

Memory is taken as sequences grow, in blocks of `block_size` tokens: each layer has a pool
[num_blocks, block_size, C + R], and each sequence a block table listing its blocks in order.
Pools are separate per layer so that growing one (allocate larger, copy, free) costs a transient
of 1/num_layers of the cache rather than doubling it. Sequences can be forked: the fork shares
every block of its parent (reference counted); the one block that is still being filled is
copied when either side writes to it next (copy-on-write), so n continuations of one prompt hold
one copy of the prompt.

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
    """Where the S new tokens of each of B sequences go, for one forward pass (built by `prepare`).

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


class LatentCache:
    def __init__(self, config: ModelConfig, device: torch.device | str | None = None,
                 dtype: torch.dtype = torch.bfloat16, block_size: int = 64, fp8: bool = False,
                 max_tokens: int | None = None):
        if block_size <= 0 or block_size & (block_size - 1):
            raise ValueError(f"block_size={block_size} must be a power of two")
        self.dtype, self.block_size, self.fp8 = dtype, block_size, fp8
        self.kv_lora_rank = config.kv_lora_rank
        self.width = config.kv_lora_rank + config.qk_rope_head_dim
        self.max_tokens = max_tokens
        self.device = torch.device(device or "cpu")
        shape = (0, block_size, self.width)
        self.kv = [torch.empty(shape, dtype=FP8 if fp8 else dtype, device=self.device)
                   for _ in range(config.num_hidden_layers)]
        self.kv_scale = ([torch.empty(0, block_size, 2, device=self.device) for _ in self.kv] if fp8 else None)
        self.refcount: list[int] = []          # per block; 0 = free
        self.free_blocks: list[int] = []
        self.blocks: dict[int, list[int]] = {}  # sequence id -> its blocks, in order
        self.lengths: dict[int, int] = {}
        self._next_id = 0

    # ------------------------------------------------------------------------------ bookkeeping
    @property
    def num_blocks(self) -> int:
        return len(self.refcount)

    @property
    def nbytes(self) -> int:
        """Bytes allocated now, over all layers."""
        pools = self.kv + (self.kv_scale or [])
        return sum(t.numel() * t.element_size() for t in pools)

    def bytes_per_token(self) -> int:
        per_layer = self.width * (1 if self.fp8 else self.dtype.itemsize)
        return len(self.kv) * (per_layer + (8 if self.fp8 else 0))

    def add_sequence(self) -> int:
        seq = self._next_id
        self._next_id += 1
        self.blocks[seq], self.lengths[seq] = [], 0
        return seq

    def fork(self, seq: int) -> int:
        """A new sequence with `seq`'s tokens, sharing its blocks until either writes to a shared block."""
        child = self.add_sequence()
        self.blocks[child], self.lengths[child] = list(self.blocks[seq]), self.lengths[seq]
        for b in self.blocks[seq]:
            self.refcount[b] += 1
        return child

    def free(self, seq: int) -> None:
        for b in self.blocks.pop(seq):
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                self.free_blocks.append(b)
        del self.lengths[seq]

    def length(self, seq: int) -> int:
        return self.lengths[seq]

    def _grow(self, needed: int) -> None:
        """Make room for at least `needed` more free blocks: each layer's pool is reallocated in turn."""
        old = self.num_blocks
        new = max(old + needed, old + old // 4, 16)
        if self.max_tokens is not None and new * self.block_size > self.max_tokens:
            new = self.max_tokens // self.block_size
            if new < old + needed:
                raise RuntimeError(f"KV cache is full: max_tokens={self.max_tokens} reached")
        for pools in (self.kv, self.kv_scale or []):
            for i, pool in enumerate(pools):
                grown = pool.new_zeros((new,) + tuple(pool.shape[1:]))
                grown[:old] = pool
                pools[i] = grown
        self.refcount += [0] * (new - old)
        self.free_blocks += range(new - 1, old - 1, -1)  # pop() hands out the lowest first

    def reserve(self, num_tokens: int) -> None:
        """Grow the pools now so that `num_tokens` more tokens fit in free blocks without a reallocation
        (a CUDA graph holds the pools' addresses; growing later forces a re-capture)."""
        needed = -(-num_tokens // self.block_size) - len(self.free_blocks)
        if needed > 0:
            self._grow(needed)

    def adopt(self, kv: list[torch.Tensor], kv_scale: list[torch.Tensor] | None = None) -> None:
        """Take over the pools of a cache that is gone (same layers, block size and dtype): an empty cache
        then reuses its memory, and CUDA graphs captured against those addresses stay valid."""
        if self.num_blocks:
            raise ValueError("adopt: this cache already has blocks")
        if [t.shape[1:] for t in kv] != [t.shape[1:] for t in self.kv] or kv[0].dtype != self.kv[0].dtype \
                or (kv_scale is None) != (self.kv_scale is None):
            raise ValueError("adopt: the pools do not match this cache's layers, block size, width or dtype")
        self.kv, self.kv_scale = kv, kv_scale
        self.refcount = [0] * kv[0].shape[0]
        self.free_blocks = list(range(kv[0].shape[0] - 1, -1, -1))

    def _take_block(self) -> int:
        if not self.free_blocks:
            self._grow(1)
        b = self.free_blocks.pop()
        self.refcount[b] = 1
        return b

    def _reserve(self, seq: int, new_tokens: int) -> None:
        blocks, length = self.blocks[seq], self.lengths[seq]
        if length % self.block_size and self.refcount[blocks[-1]] > 1:
            # Copy-on-write: the partly filled last block is shared with a fork.
            shared, own = blocks[-1], self._take_block()
            for pools in (self.kv, self.kv_scale or []):
                for pool in pools:
                    pool[own] = pool[shared]
            self.refcount[shared] -= 1
            blocks[-1] = own
        needed = -(-(length + new_tokens) // self.block_size) - len(blocks)
        if needed > len(self.free_blocks):
            self._grow(needed - len(self.free_blocks))
        blocks += [self._take_block() for _ in range(needed)]

    def prepare(self, seq_ids: list[int], num_new: int, device: torch.device | str | None = None) -> CacheBatch:
        """Reserve room for `num_new` more tokens in each sequence and describe where they go.

        The sequences' lengths advance now; the forward pass that follows writes every layer.
        The tensors are on `device` (default: the cache's; the CUDA-graph runner asks for "cpu"
        and uploads them itself, once per step, into its static buffers).
        """
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("a sequence appears twice in one batch")
        for seq in seq_ids:
            self._reserve(seq, num_new)
        starts = torch.tensor([self.lengths[s] for s in seq_ids])
        positions = starts[:, None] + torch.arange(num_new)                       # [B, S]
        max_blocks = max(len(self.blocks[s]) for s in seq_ids)
        table = torch.zeros(len(seq_ids), max_blocks, dtype=torch.int32)
        for i, seq in enumerate(seq_ids):
            table[i, : len(self.blocks[seq])] = torch.tensor(self.blocks[seq], dtype=torch.int32)
            self.lengths[seq] += num_new
        slots = table.gather(1, positions // self.block_size).long() * self.block_size + positions % self.block_size
        device = self.device if device is None else device
        return CacheBatch(list(seq_ids), positions.to(device), slots.to(device), table.to(device),
                          (starts + num_new).to(torch.int32).to(device), int(starts.max()) + num_new)

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
