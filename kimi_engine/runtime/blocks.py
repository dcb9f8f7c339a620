"""The block manager: which cache blocks hold which sequence's tokens, and the prefix cache over them.

A sequence's latents live in fixed-size blocks of the paged pools (cache.py); its block table lists
them in order. Blocks are reference counted: a fork shares all of its parent's blocks, and the one
still being filled is copied when either side next writes to it (copy-on-write).

The prefix cache is chained block hashes (vLLM's "automatic prefix caching"), not a radix tree
(SGLang's RadixAttention). A full block is named by a digest of its parent block's digest and its
own tokens, so the longest cached prefix of a prompt is found by hashing its full blocks in order
and looking each up in one dict, and the unit of eviction is the unit of allocation. A radix tree
would also share the last, partly filled block (at most block_size - 1 tokens a request) at the cost
of splitting nodes on every divergent insert; with 64-token blocks the hashes are the simpler trade.
Digests are blake2b, not Python's hash(): two different prefixes must never share latents, even when a
client crafts its tokens to collide.

Blocks of prompts and of generated tokens are registered alike as they fill, so a finished request's
whole conversation stays cached. A block nobody references but whose digest is registered is kept
in an LRU list and evicted (oldest first) only when a block is needed and the pools are at their
budget; blocks of running sequences are never evicted. Memory is taken from the pools lazily, up to
`max_blocks`.
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict

import torch

from ..cache import CacheBatch, LatentCache

_ROOT = b"kimi-engine prefix cache"


class CacheFull(RuntimeError):
    """No block can be had: every block belongs to a running sequence and the pools are at their budget."""


def block_digest(parent: bytes, tokens) -> bytes:
    """The name of a full block: its parent's name and its own token ids."""
    return hashlib.blake2b(parent + array("q", tokens).tobytes(), digest_size=16).digest()


class BlockManager:
    """Sequences over the blocks of one LatentCache, with the prefix cache.

    max_blocks: the most blocks the pools may hold (None: no limit beyond memory). prefix_cache:
    register full blocks for reuse (False: freed blocks are simply free). Counters: evicted_blocks.
    """

    def __init__(self, pools: LatentCache, max_blocks: int | None = None, prefix_cache: bool = True):
        if max_blocks is not None and max_blocks < 1:
            raise ValueError(f"max_blocks={max_blocks} must be >= 1")
        self.pools, self.block_size = pools, pools.block_size
        self.max_blocks, self.prefix_cache = max_blocks, prefix_cache
        self.refcount: list[int] = [0] * pools.num_blocks
        self.free_blocks: list[int] = list(range(pools.num_blocks - 1, -1, -1))   # pop() hands out the lowest
        self.cached = OrderedDict()                  # unreferenced registered blocks, least recently used first
        self.digest_of: dict[int, bytes] = {}        # registered block -> its digest
        self.block_of: dict[bytes, int] = {}         # digest -> registered block
        self.tables: dict[int, list[int]] = {}       # sequence -> its blocks, in order
        self.lengths: dict[int, int] = {}            # sequence -> tokens written
        self.digests: dict[int, list[bytes]] = {}    # sequence -> digests of its full blocks
        self.copies: list[tuple[int, int]] = []      # (src, dst) block copies made since the caller last took them
        self.evicted_blocks = 0
        self._next_id = 0

    # ------------------------------------------------------------------------------ sequences
    def add_sequence(self) -> int:
        seq = self._next_id
        self._next_id += 1
        self.tables[seq], self.lengths[seq], self.digests[seq] = [], 0, []
        return seq

    def length(self, seq: int) -> int:
        return self.lengths[seq]

    def fork(self, seq: int) -> int:
        """A new sequence with `seq`'s tokens, sharing its blocks until either writes to a shared block."""
        child = self.add_sequence()
        self.tables[child], self.lengths[child] = list(self.tables[seq]), self.lengths[seq]
        self.digests[child] = list(self.digests[seq])
        for b in self.tables[seq]:
            self.refcount[b] += 1
        return child

    def free(self, seq: int) -> None:
        """Release a sequence. Its registered blocks stay cached (tail first in the LRU order, so a
        shared head outlives the tails that branch from it); the rest become free."""
        for b in reversed(self.tables.pop(seq)):
            self.refcount[b] -= 1
            if self.refcount[b] == 0:
                if b in self.digest_of:
                    self.cached[b] = None
                else:
                    self.free_blocks.append(b)
        del self.lengths[seq], self.digests[seq]

    def match_prefix(self, seq: int, tokens: list[int]) -> int:
        """Attach to an empty sequence the cached blocks of the longest prefix of `tokens` (leaving at
        least one token to compute: its logits are needed). Returns the tokens matched."""
        if self.tables[seq]:
            raise ValueError("match_prefix: the sequence already holds tokens")
        if not self.prefix_cache:
            return 0
        bs, parent, digests, table = self.block_size, _ROOT, self.digests[seq], self.tables[seq]
        for start in range(0, len(tokens) - bs, bs):   # block ends <= len(tokens) - 1
            digest = block_digest(parent, tokens[start:start + bs])
            b = self.block_of.get(digest)
            if b is None:
                break
            if self.refcount[b] == 0:
                del self.cached[b]
            self.refcount[b] += 1
            table.append(b)
            digests.append(digest)
            parent = digest
        self.lengths[seq] = len(table) * bs
        return self.lengths[seq]

    def commit(self, seq: int, tokens: list[int]) -> None:
        """Register the sequence's blocks that are now full; `tokens` are its tokens (at least those written)."""
        bs, digests, table = self.block_size, self.digests[seq], self.tables[seq]
        for i in range(len(digests), self.lengths[seq] // bs):
            digest = block_digest(digests[-1] if digests else _ROOT, tokens[i * bs:(i + 1) * bs])
            digests.append(digest)
            b = table[i]
            if self.prefix_cache and digest not in self.block_of and b not in self.digest_of:
                self.block_of[digest], self.digest_of[b] = b, digest

    # ------------------------------------------------------------------------------ room
    def available(self) -> int:
        """Blocks that can be handed out now: free, not yet allocated within the budget, or evictable."""
        if self.max_blocks is None:
            return 1 << 62
        return len(self.free_blocks) + len(self.cached) + self.max_blocks - self.pools.num_blocks

    def blocks_needed(self, seq: int, num_new: int) -> int:
        """Blocks that appending num_new tokens to seq takes (a copy-on-write included)."""
        table, length = self.tables[seq], self.lengths[seq]
        cow = 1 if length % self.block_size and self.refcount[table[-1]] > 1 else 0
        return cow + max(0, -(-(length + num_new) // self.block_size) - len(table))

    def room(self, seq: int) -> int:
        """How many tokens can be appended to seq now."""
        table, length, a = self.tables[seq], self.lengths[seq], self.available()
        if length % self.block_size and self.refcount[table[-1]] > 1:
            a -= 1                                       # the shared last block must be copied first
            if a < 0:
                return 0
        return len(table) * self.block_size - length + a * self.block_size

    def _take(self) -> int:
        if not self.free_blocks:
            if self.max_blocks is None or self.pools.num_blocks < self.max_blocks:
                self._grow()
            elif self.cached:
                b, _ = self.cached.popitem(last=False)
                del self.block_of[self.digest_of.pop(b)]
                self.evicted_blocks += 1
                self.free_blocks.append(b)
            else:
                raise CacheFull(f"KV cache is full: all {self.pools.num_blocks} blocks of {self.block_size} tokens "
                                "belong to running sequences")
        b = self.free_blocks.pop()
        self.refcount[b] = 1
        return b

    def _grow(self) -> None:
        old = self.pools.num_blocks
        new = max(old + 1, old + old // 4, 16)
        self.reserve(new if self.max_blocks is None else min(new, self.max_blocks))

    def reserve(self, num_blocks: int) -> None:
        """Allocate the pools up to num_blocks now (CUDA graphs hold the pools' addresses)."""
        old = self.pools.num_blocks
        if num_blocks > old:
            self.pools.grow(num_blocks)
            self.refcount += [0] * (num_blocks - old)
            self.free_blocks[:0] = range(num_blocks - 1, old - 1, -1)   # behind the free ones: pop() takes those first

    # ------------------------------------------------------------------------------ a forward pass
    def prepare(self, seq_ids: list[int], num_new: int, device: torch.device | str | None = None) -> CacheBatch:
        """Make room for num_new more tokens in each sequence and describe where they go (CacheBatch).

        The lengths advance now; the forward pass that follows writes every layer. Raises CacheFull
        (and changes nothing) when the blocks cannot be had. Tensors on `device` (default: the pools').
        """
        if len(set(seq_ids)) != len(seq_ids):
            raise ValueError("a sequence appears twice in one batch")
        if sum(self.blocks_needed(s, num_new) for s in seq_ids) > self.available():
            raise CacheFull(f"KV cache is full: {len(seq_ids)} sequence(s) need more blocks than the "
                            f"{self.available()} that can be had")
        for seq in seq_ids:
            self._append(seq, num_new)
        # Plain Python, then one tensor each: a decode step calls this every step, after its weights
        # have streamed through the caches, where each torch op costs several microseconds.
        bs = self.block_size
        starts = [self.lengths[s] for s in seq_ids]
        positions = [list(range(a, a + num_new)) for a in starts]                # [B, S]
        width = max(len(self.tables[s]) for s in seq_ids)
        table = [self.tables[s] + [0] * (width - len(self.tables[s])) for s in seq_ids]
        slots = [[row[p // bs] * bs + p % bs for p in pos] for row, pos in zip(table, positions)]
        for seq in seq_ids:
            self.lengths[seq] += num_new
        device = self.pools.device if device is None else device
        return CacheBatch(list(seq_ids), torch.tensor(positions, device=device), torch.tensor(slots, device=device),
                          torch.tensor(table, dtype=torch.int32, device=device),
                          torch.tensor([a + num_new for a in starts], dtype=torch.int32, device=device),
                          max(starts) + num_new)

    def _append(self, seq: int, num_new: int) -> None:
        table, length = self.tables[seq], self.lengths[seq]
        if length % self.block_size and self.refcount[table[-1]] > 1:
            shared, own = table[-1], self._take()        # copy-on-write of the shared, partly filled block
            self.pools.copy_block(shared, own)
            self.copies.append((shared, own))
            self.refcount[shared] -= 1
            table[-1] = own
        while len(table) * self.block_size < length + num_new:
            table.append(self._take())

    def take_copies(self) -> list[tuple[int, int]]:
        """The copy-on-write copies made since the last call (followers under tensor parallelism replay them)."""
        copies, self.copies = self.copies, []
        return copies

    # ------------------------------------------------------------------------------ accounting
    @property
    def num_cached_blocks(self) -> int:
        """Unreferenced blocks kept for their prefix."""
        return len(self.cached)

    @property
    def num_used_blocks(self) -> int:
        return sum(1 for r in self.refcount if r > 0)
