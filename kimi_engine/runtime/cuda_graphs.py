"""CUDA-graph decode: the decode step captured once per batch-size bucket, then replayed.

A decode step launches on the order of a hundred kernels per layer (an op trace of the tiny model:
norms, rope, casts, projections, the Triton kernels), thousands for 61 layers; launched one by one
from Python at batch 1, the CPU rather than HBM can set the pace. A CUDA graph records the launches
once and replays them with one call. What that asks of the step:
- Static inputs: a graph reads fixed addresses, so each step copies its batch (tokens, positions,
  slots, block table, lengths) into buffers allocated once, uploaded from pinned memory. A
  batch of B runs in the smallest bucket >= B (1, 2, 4, ..., max_batch_size); the spare rows are a
  harmless dummy: token 0 at position 0, written to and attending to a scratch block of the cache
  that no sequence uses (the engine holds one scratch sequence for it).
- No host syncs, a fixed grid: the Triton kernels are sync-free, and mla_decode sizes its split-KV
  grid from the engine's max_seq_len, fixed, rather than from this step's lengths.
- Fixed cache pools: a graph holds each layer's pool address. The engine's one long-lived cache is
  allocated up front to its budget on CUDA, so graphs are captured once; should the pools change
  anyway (they grew), every graph is captured again.
Off CUDA the same static-buffer step runs eagerly, so CPU tests check the buffers, the padding and
the buckets against Runner.decode without graphs.
"""

from __future__ import annotations

import time

import torch

from .. import ops
from ..cache import CacheBatch, LatentCache
from ..model import Experts

WARMUP_STEPS = 2   # eager runs before a capture: Triton compiles, cuBLAS picks kernels and workspaces


def bucket_sizes(max_batch_size: int) -> tuple[int, ...]:
    """The batch sizes that get a graph: the powers of two below max_batch_size, then max_batch_size."""
    sizes, b = [], 1
    while b < max_batch_size:
        sizes.append(b)
        b *= 2
    return tuple(sizes) + (max_batch_size,)


def pool_addresses(cache: LatentCache) -> tuple[tuple[int, tuple[int, ...]], ...]:
    """What a captured graph holds of each pool: its address, and its shape (index bounds are baked in
    too: a regrown pool at the same address still needs a new capture)."""
    return tuple((t.data_ptr(), tuple(t.shape)) for t in cache.kv + (cache.kv_scale or []))


def check_not_parallel(parallel) -> None:
    """ValueError for a tensor/expert-parallel model (a Parallel of world size > 1): its all-reduces are not captured."""
    if parallel is not None and parallel.world_size > 1:
        raise ValueError("cuda_graphs: tensor/expert-parallel models are not supported (all-reduces are not captured)")


def check_capturable(model) -> None:
    """ValueError for models whose decode step cannot be captured: their ops read back to the host."""
    check_not_parallel(model.parallel)
    if any(isinstance(m, Experts) and not m.int4 for m in model.modules()):
        raise ValueError("cuda_graphs needs INT4 routed experts: bf16 experts run a reference loop that reads "
                         "the expert ids back to the host")


class DecodeGraphs:
    """Decode steps through static buffers, one CUDA graph per batch-size bucket (eager off CUDA).

    decode(batch, tokens) is Runner.decode's contract. scratch: (block, slot) of a sequence nobody
    else uses, for the padding rows. Attributes: buckets; graphs (bucket -> (CUDAGraph, logits) on
    CUDA, None elsewhere); captures (how many so far, re-captures included); capture_seconds (bucket ->
    seconds its last capture took, warm-up included).
    """

    def __init__(self, model, pools: LatentCache, max_batch_size: int, max_seq_len: int, scratch: tuple[int, int]):
        self.model, self.pools, self.max_seq_len = model, pools, max_seq_len
        self.device = model.rope_cos.device
        self.use_graphs = self.device.type == "cuda"
        if self.use_graphs:
            check_capturable(model)
        self.buckets = bucket_sizes(max_batch_size)
        self.graphs: dict[int, tuple[torch.cuda.CUDAGraph, torch.Tensor] | None] = {}
        self.captures, self.capture_seconds = 0, {}
        self._scratch_block, self._scratch_slot = scratch
        self._pools = None                   # pool addresses the graphs were captured against
        self._mempool = None
        self._allocate(pools.block_size)

    def _allocate(self, block_size: int) -> None:
        """Static buffers for the largest bucket; each bucket reads a prefix of them."""
        B = self.buckets[-1]
        self._max_blocks = -(-self.max_seq_len // block_size)
        pin = self.use_graphs   # pinned host memory: the upload is asynchronous
        # int64 rows: tokens, positions, slots; int32: seq_lens [B], then the block table [B, max_blocks].
        self._host_long = torch.zeros(3, B, dtype=torch.long, pin_memory=pin)
        self._host_int = torch.zeros(B + B * self._max_blocks, dtype=torch.int32, pin_memory=pin)
        if self.device.type == "cpu":
            self._dev_long, self._dev_int = self._host_long, self._host_int
        else:
            self._dev_long = torch.zeros_like(self._host_long, device=self.device)
            self._dev_int = torch.zeros_like(self._host_int, device=self.device)
        self._uploaded = torch.cuda.Event() if self.use_graphs else None
        self.graphs.clear()

    # ------------------------------------------------------------------------------ the step
    def decode(self, batch: CacheBatch, tokens) -> torch.Tensor:
        """One new token for each sequence of `batch` (host tensors) -> next-token logits [B, vocab] float32."""
        if not self.use_graphs:
            return self._decode(batch, tokens)
        # The capture stream and the upload event follow the current device: make it the engine's.
        with torch.cuda.device(self.device):
            return self._decode(batch, tokens)

    @torch.inference_mode()
    def _decode(self, batch: CacheBatch, tokens) -> torch.Tensor:
        B = len(batch.seq_ids)
        if not 1 <= B <= self.buckets[-1]:
            raise ValueError(f"decode: {B} sequences; the CUDA-graph buckets hold 1 to {self.buckets[-1]} "
                             "(max_batch_size)")
        tokens = torch.as_tensor(tokens, dtype=torch.long).reshape(-1)
        if tokens.numel() != B:
            raise ValueError(f"decode: {tokens.numel()} tokens for {B} sequences")
        if batch.block_table.shape[1] > self._max_blocks:
            raise ValueError(f"decode: a sequence is longer than max_seq_len={self.max_seq_len}")
        bucket = next(b for b in self.buckets if b >= B)
        self._upload(batch, tokens, B, bucket)
        pools = pool_addresses(self.pools)
        if pools != self._pools:
            self.graphs.clear()
            self._pools, self._mempool = pools, None
        if bucket not in self.graphs:
            self.graphs[bucket] = self._capture(bucket) if self.use_graphs else None
        if self.graphs[bucket] is None:
            return self._step(bucket)[:B]
        graph, logits = self.graphs[bucket]
        graph.replay()
        # The graphs share one memory pool, so the next replay may reuse this output's memory.
        return logits[:B].clone()

    def _upload(self, batch: CacheBatch, tokens: torch.Tensor, B: int, bucket: int) -> None:
        hl, hi, Bmax = self._host_long, self._host_int, self.buckets[-1]
        if self._uploaded is not None:
            self._uploaded.synchronize()     # the last upload has left the pinned buffers
        device_tokens = tokens.device != hl.device
        if not device_tokens:
            hl[0, :B] = tokens
        hl[1, :B], hl[2, :B] = batch.positions[:, 0], batch.slots[:, 0]
        hl[:2, B:bucket], hl[2, B:bucket] = 0, self._scratch_slot          # padding: token 0 at position 0
        hi[:B], hi[B:bucket] = batch.seq_lens, 1
        table = hi[Bmax:].view(Bmax, self._max_blocks)
        table[:B, :batch.block_table.shape[1]] = batch.block_table       # entries past a length are never read
        table[B:bucket, 0] = self._scratch_block
        if self._dev_long is not hl:
            self._dev_long.copy_(hl, non_blocking=True)
            end = Bmax + bucket * self._max_blocks                          # lengths + this bucket's rows
            self._dev_int[:end].copy_(hi[:end], non_blocking=True)
            if self._uploaded is not None:
                self._uploaded.record()
        if device_tokens:
            self._dev_long[0, :B].copy_(tokens)

    def _step(self, bucket: int) -> torch.Tensor:
        """The decode forward pass on the static buffers' first `bucket` rows -> logits [bucket, V] float32."""
        Bmax = self.buckets[-1]
        tokens, positions, slots = (self._dev_long[i, :bucket].view(bucket, 1) for i in range(3))
        table = self._dev_int[Bmax:Bmax + bucket * self._max_blocks].view(bucket, self._max_blocks)
        batch = CacheBatch([-1] * bucket, positions, slots, table, self._dev_int[:bucket], self.max_seq_len)
        return self.model(tokens, batch, self.pools)[:, -1].float()

    def _capture(self, bucket: int) -> tuple[torch.cuda.CUDAGraph, torch.Tensor]:
        if not ops.use_triton(self._dev_long):
            raise RuntimeError(f"CUDA graphs need the Triton kernels, but {ops.KERNELS_ENV}={ops.kernel_mode()} "
                               "runs the torch references, which read back to the host")
        start = time.perf_counter()
        # Warm-up on a side stream, as torch.cuda.graph requires; it writes the same latents the replay will.
        stream = torch.cuda.Stream(self.device)
        stream.wait_stream(torch.cuda.current_stream(self.device))
        with torch.cuda.stream(stream):
            for _ in range(WARMUP_STEPS):
                self._step(bucket)
        torch.cuda.current_stream(self.device).wait_stream(stream)
        if self._mempool is None:
            self._mempool = torch.cuda.graph_pool_handle()
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph, pool=self._mempool):
            logits = self._step(bucket)
        self.captures += 1
        self.capture_seconds[bucket] = time.perf_counter() - start
        return graph, logits
