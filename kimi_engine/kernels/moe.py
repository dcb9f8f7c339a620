"""Mixture of experts over stacked expert weights: SiLU(x W_gate^T) * (x W_up^T) W_down^T, weighted and summed.

The fused INT4 path (vLLM's fused-MoE design, on the checkpoint's own INT4 layout):
  1. moe_align: the T*K (token, slot) pairs, sorted expert-major into blocks of BLOCK_M rows, each
     expert's run padded to a whole block, so every block multiplies by a single expert.
  2. moe_gate_up_kernel: per (block, N tile) one program computes gate and up for its rows and stores
     h = SiLU(gate) * up                                                      [T*K, I]
  3. moe_down_kernel: y = (h @ W_down^T) * routing weight                     [T*K, D]
  4. the top-k combine: out[t] = sum_k y[t*K + k] (float32 accumulation)     [T, D]
Decode (at most one pair per expert on average) runs with BLOCK_M = 1: no sorting, no padding, one
program per (pair, N tile) streaming that expert's rows once through the GEMV body of
int4_tile_matmul. Prefill runs tiled tl.dot over the sorted blocks.
"""

from __future__ import annotations

import math
from typing import Callable

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from ..int4 import dequantize
from .w4a16 import capability, check_int4_weight, dot_dtype, int4_tile_matmul, is_interpreted


def moe_loop_ref(
    x: torch.Tensor,
    expert_weights: Callable[[int], tuple],
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
    linear: Callable = F.linear,
) -> torch.Tensor:
    """x [T, D], routing weights/ids [T, K] -> [T, D] in x.dtype.

    `expert_weights(e)` gives expert e's (gate_up [2I, D], down [D, I]), which `linear(x, w)` applies
    (by default F.linear on weights in x.dtype). Vectorized over tokens: one pass per expert that
    received tokens; the weighted sum accumulates in float32. An id of -1 (an expert held by another
    rank under expert parallelism) contributes nothing.
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in topk_ids.unique().tolist():
        if e < 0:
            continue
        token, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        gate_up, down = expert_weights(e)
        gate, up = linear(x[token], gate_up).chunk(2, dim=-1)
        y = linear(F.silu(gate) * up, down)                              # [n, D]
        out.index_add_(0, token, y.float() * topk_weights[token, slot, None].float())
    return out.to(x.dtype)


def fused_moe_ref(
    x: torch.Tensor,
    gate_up_packed: torch.Tensor,
    gate_up_scale: torch.Tensor,
    down_packed: torch.Tensor,
    down_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """INT4 experts: x [T, D]; gate_up [E, 2I, D/8] + [E, 2I, D/G]; down [E, D, I/8] + [E, D, I/G] -> [T, D].

    Each touched expert is dequantized to x.dtype, then computed as in moe_loop_ref.
    """
    def expert_weights(e: int):
        return (dequantize(gate_up_packed[e], gate_up_scale[e], x.dtype),
                dequantize(down_packed[e], down_scale[e], x.dtype))
    return moe_loop_ref(x, expert_weights, topk_weights, topk_ids)


# ------------------------------------------------------------------------------------------ align
def moe_align(topk_ids: torch.Tensor, num_experts: int, block_m: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Expert-major blocks of (token, slot) pairs -> (sorted_ids [R] int32, block_expert [R / block_m] int32).

    sorted_ids holds pair indices p = t*K + k, each expert's run padded to a multiple of block_m with
    the sentinel T*K; block_expert[b] is the expert of block b, or -1 for blocks to skip: the unused
    ones at the end, and those of pairs whose id is -1 (another rank's expert), sorted last as if
    they were expert E. R = T*K + min(E + 1, T*K) * (block_m - 1) (rounded up to a block) bounds the
    padded length without a host sync. Experts without tokens get no blocks. With block_m == 1 the
    pairs stay in their natural order (no sort, no padding: the decode path).
    """
    pairs = topk_ids.numel()
    flat = topk_ids.reshape(-1)
    if block_m == 1:
        return torch.arange(pairs, dtype=torch.int32, device=flat.device), flat.to(torch.int32)
    flat = flat.long().masked_fill(flat < 0, num_experts)                # -1 -> run E, whose blocks are skipped
    runs = num_experts + 1
    counts = torch.zeros(runs, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)                                              # [E + 1] end of each expert's run
    order = torch.argsort(flat, stable=True)                             # pair indices, expert-major
    expert_of = flat[order]
    rank = torch.arange(pairs, device=flat.device) - (counts.cumsum(0) - counts)[expert_of]
    rows = triton.cdiv(pairs + min(runs, pairs) * (block_m - 1), block_m) * block_m
    sorted_ids = torch.full((rows,), pairs, dtype=torch.int32, device=flat.device)
    sorted_ids[(ends - padded)[expert_of] + rank] = order.to(torch.int32)
    block_start = torch.arange(0, rows, block_m, device=flat.device)
    block_expert = torch.searchsorted(ends, block_start, right=True)     # first expert whose run ends past it
    return sorted_ids, torch.where(block_expert < num_experts, block_expert, -1).to(torch.int32)


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def moe_gate_up_kernel(
    # pointers
    x_ptr, w_ptr, s_ptr, h_ptr, sorted_ids_ptr, block_expert_ptr,
    # sizes
    num_pairs, I, D,
    # strides
    stride_xt, stride_xd, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_hp, stride_hi,
    # constexprs
    TOP_K: tl.constexpr, GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
    BLOCK_K: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    """h[p, n] = SiLU(x[t] . W_gate[e, n]) * (x[t] . W_up[e, n]) for the pairs p = t*K + k of one block."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:                                       # past the last expert's run
        return
    rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))  # [BLOCK_M] pair ids
    row_mask = rows < num_pairs                          # padding rows hold the sentinel num_pairs
    a_rows = x_ptr + (rows // TOP_K).to(tl.int64) * stride_xt
    w = w_ptr + expert.to(tl.int64) * stride_we
    s = s_ptr + expert.to(tl.int64) * stride_se
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < I
    # gate is rows [0, I) of the stacked gate_up weight, up is rows [I, 2I)
    if BLOCK_M == 1:   # decode: one pass over K for both, columns [gate tile | up tile] (twice the loads in flight)
        j = tl.arange(0, 2 * BLOCK_N)
        cols = pid_n * BLOCK_N + j % BLOCK_N
        both = int4_tile_matmul(a_rows, w, s, row_mask, cols + (j // BLOCK_N) * I, cols < I, 0, D,
                                stride_xd, stride_wn, stride_wk, stride_sn, stride_sk,
                                GROUP, BLOCK_M, 2 * BLOCK_N, BLOCK_K, DOT_DTYPE)
        gate, up = tl.split(tl.permute(tl.reshape(both, (BLOCK_M, 2, BLOCK_N)), (0, 2, 1)))
    else:
        gate = int4_tile_matmul(a_rows, w, s, row_mask, offs_n, n_mask, 0, D,
                                stride_xd, stride_wn, stride_wk, stride_sn, stride_sk,
                                GROUP, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE)
        up = int4_tile_matmul(a_rows, w, s, row_mask, offs_n + I, n_mask, 0, D,
                              stride_xd, stride_wn, stride_wk, stride_sn, stride_sk,
                              GROUP, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE)
    h = gate * tl.sigmoid(gate) * up
    h_ptrs = h_ptr + rows.to(tl.int64)[:, None] * stride_hp + offs_n[None, :] * stride_hi
    tl.store(h_ptrs, h.to(h_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


@triton.jit
def moe_down_kernel(
    # pointers
    h_ptr, w_ptr, s_ptr, topk_weights_ptr, y_ptr, sorted_ids_ptr, block_expert_ptr,
    # sizes
    num_pairs, D, I,
    # strides
    stride_hp, stride_hi, stride_we, stride_wn, stride_wk, stride_se, stride_sn, stride_sk, stride_yp, stride_yd,
    # constexprs
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """y[p, n] = (h[p] . W_down[e, n]) * topk_weights[p] for the pairs p of one block."""
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    expert = tl.load(block_expert_ptr + pid_m)
    if expert < 0:
        return
    rows = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    row_mask = rows < num_pairs
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    n_mask = offs_n < D
    acc = int4_tile_matmul(h_ptr + rows.to(tl.int64) * stride_hp,
                           w_ptr + expert.to(tl.int64) * stride_we, s_ptr + expert.to(tl.int64) * stride_se,
                           row_mask, offs_n, n_mask, 0, I,
                           stride_hi, stride_wn, stride_wk, stride_sn, stride_sk,
                           GROUP, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE)
    routing = tl.load(topk_weights_ptr + rows, mask=row_mask, other=0).to(tl.float32)
    y_ptrs = y_ptr + rows.to(tl.int64)[:, None] * stride_yp + offs_n[None, :] * stride_yd
    tl.store(y_ptrs, (acc * routing[:, None]).to(y_ptr.dtype.element_ty), mask=row_mask[:, None] & n_mask[None, :])


# ------------------------------------------------------------------------------------------ configs
# Keyed on pairs per expert (T*K / E). Tuned on an H200 with benchmarks/tune_int4.py at Kimi K2's widths
# (bf16; times of both kernels together, T tokens, 2026-12-04):
#   (max pairs per expert, BLOCK_M, BLOCK_N, BLOCK_K, num_warps, num_stages)
MOE_CONFIGS = [
    (1, 1, 8, 512, 4, 3),              # decode GEMV, gate and up in one pass: T=1 171 us, T=8 1.13 ms
    (8, 16, 64, 128, 4, 4),            # a 16-row block per expert: T=64 8.5 ms
    (32, 32, 64, 128, 4, 4),           # T=512 14.4 ms
    (math.inf, 128, 128, 128, 8, 3),   # prefill: T=4096 20.1 ms
]
# Before Hopper a 128x128x128 tile spills inside the loop (aot --arch 80: 90 spill loads/stores in
# gate_up); 64-deep K steps fit. Untimed (on the H200 this row takes 24.5 ms at T=4096).
MOE_PRE_HOPPER_CONFIGS = MOE_CONFIGS[:-1] + [(math.inf, 128, 128, 64, 8, 3)]
MOE_INTERPRET_CONFIGS = [
    (1, 1, 64, 64, 1, 1),
    (math.inf, 16, 64, 64, 1, 1),
]


# ------------------------------------------------------------------------------------------ wrapper
def fused_moe(
    x: torch.Tensor,
    gate_up_packed: torch.Tensor,
    gate_up_scale: torch.Tensor,
    down_packed: torch.Tensor,
    down_scale: torch.Tensor,
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """INT4 routed experts, fused: x [T, D] -> [T, D] in x.dtype; same layout and result as fused_moe_ref.

    gate_up_packed int32 [E, 2I, D/8] + gate_up_scale [E, 2I, D/G] (rows :I gate, I: up), down_packed
    [E, D, I/8] + down_scale [E, D, I/G]; topk_weights [T, K] float, topk_ids [T, K] int in [0, E),
    or -1 for a pair to skip (another rank's expert under expert parallelism; not checked: that
    would sync the host). h and y are kept in x.dtype, as in the reference.
    """
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x must be a 2-D bf16/fp16/fp32 tensor [T, D], got {x.dtype} {tuple(x.shape)}")
    T, D = x.shape
    if gate_up_packed.dim() != 3 or down_packed.dim() != 3:
        raise ValueError(f"gate_up_packed and down_packed must be [E, 2I, D/8] and [E, D, I/8], got "
                         f"{tuple(gate_up_packed.shape)} and {tuple(down_packed.shape)}")
    E, two_i, _ = gate_up_packed.shape
    I = two_i // 2
    if two_i % 2 or down_packed.shape[:2] != (E, D):
        raise ValueError(f"down_packed {tuple(down_packed.shape)} does not match gate_up_packed "
                         f"{tuple(gate_up_packed.shape)} and x {tuple(x.shape)}")
    group = D // max(gate_up_scale.shape[-1], 1)
    check_int4_weight("gate_up_", gate_up_packed, gate_up_scale, D, group)
    check_int4_weight("down_", down_packed, down_scale, I, group)
    if topk_ids.shape != topk_weights.shape or topk_ids.dim() != 2 or topk_ids.shape[0] != T:
        raise ValueError(f"topk_weights {tuple(topk_weights.shape)} and topk_ids {tuple(topk_ids.shape)} must both be [T={T}, K]")
    if topk_ids.dtype.is_floating_point or not topk_weights.dtype.is_floating_point:
        raise TypeError(f"topk_ids must be integer and topk_weights float, got {topk_ids.dtype}, {topk_weights.dtype}")
    tensors = (gate_up_packed, gate_up_scale, down_packed, down_scale, topk_weights, topk_ids)
    if any(t.device != x.device for t in tensors):
        raise ValueError(f"every argument must be on x's device {x.device}, got {[str(t.device) for t in tensors]}")
    top_k = topk_ids.shape[1]
    pairs = T * top_k
    if pairs == 0:
        return torch.zeros_like(x)

    interpreted = is_interpreted(moe_gate_up_kernel)
    table = (MOE_INTERPRET_CONFIGS if interpreted else MOE_CONFIGS if capability(x.device) >= (9, 0)
             else MOE_PRE_HOPPER_CONFIGS)
    _, block_m, block_n, block_k, num_warps, num_stages = next(c for c in table if pairs <= c[0] * E)
    block_k = max(block_k, group)           # a K step covers whole scale groups
    sorted_ids, block_expert = moe_align(topk_ids, E, block_m)
    topk_weights = topk_weights.contiguous()
    h = torch.empty(pairs, I, dtype=x.dtype, device=x.device)
    y = torch.zeros(pairs, D, dtype=x.dtype, device=x.device)   # skipped (-1) pairs add zero
    common = dict(GROUP=group, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k,
                  DOT_DTYPE=dot_dtype(x.dtype, interpreted), num_warps=num_warps, num_stages=num_stages)

    # Axis 0 walks the blocks (expert-major), so programs sharing an expert's N tile run together.
    grid = lambda meta: (block_expert.numel(), triton.cdiv(I, meta["BLOCK_N"]))
    moe_gate_up_kernel[grid](
        x, gate_up_packed, gate_up_scale, h, sorted_ids, block_expert,
        pairs, I, D,
        x.stride(0), x.stride(1), *gate_up_packed.stride(), *gate_up_scale.stride(), h.stride(0), h.stride(1),
        TOP_K=top_k, **common,
    )
    grid = lambda meta: (block_expert.numel(), triton.cdiv(D, meta["BLOCK_N"]))
    moe_down_kernel[grid](
        h, down_packed, down_scale, topk_weights, y, sorted_ids, block_expert,
        pairs, D, I,
        h.stride(0), h.stride(1), *down_packed.stride(), *down_scale.stride(), y.stride(0), y.stride(1),
        **common,
    )
    # The top-k combine: torch's reduction accumulates in float32 and rounds once, like the reference.
    return y.view(T, top_k, D).sum(dim=1)
