"""INT4 (group-quantized, compressed-tensors layout) x bf16 matmul, reading the checkpoint layout as is.

`int4_tile_matmul` is the inner loop shared with the fused MoE kernels (moe.py). It loads packed words
as [BLOCK_N, BLOCK_K/8] tiles (contiguous along K, so loads are coalesced and each word is read once)
and unpacks them in registers; the row-tile height (a block size, not a feature flag) picks the product:
  BLOCK_M == 1   GEMV for decode: elementwise products accumulated over K, one reduction at the end.
  BLOCK_M >= 16  tl.dot for prefill: the dequantized [BLOCK_N, BLOCK_K] tile feeds the tensor cores.
"""

from __future__ import annotations

import functools
import math

import torch
import triton
import triton.language as tl

from ..int4 import GROUP_SIZE, NIBBLE_OFFSET, PACK_FACTOR, dequantize

# The format's constants (int4.py), visible inside kernels.
_PACK = tl.constexpr(PACK_FACTOR)            # nibbles per int32 word
_OFFSET = tl.constexpr(NIBBLE_OFFSET)        # stored nibble = q + 8
_BITS = tl.constexpr(4)                      # bits per nibble
_MASK = tl.constexpr(0xF)


def w4a16_matmul_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ dequantize(packed [N, K/8], scale [N, K/G]).T -> [M, N] in x.dtype.

    The weight is dequantized to x.dtype first (as compressed-tensors' decompression does), then one
    matmul in x.dtype with float32 accumulation.
    """
    return x @ dequantize(packed, scale, x.dtype).T


# ------------------------------------------------------------------------------------------ kernel
@triton.jit
def int4_tile_matmul(
    # pointers: a_rows [BLOCK_M] row starts of A; one weight [N, K/8] and its scales [N, K/G]
    a_rows, w_ptr, s_ptr,
    # rows, columns, K range: valid rows [BLOCK_M]; output rows of W [BLOCK_N]; [k_start, k_end), k_end % 8 == 0
    a_mask, offs_n, n_mask, k_start, k_end,
    # strides
    stride_ak, stride_wn, stride_wk, stride_sn, stride_sk,
    # constexprs
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    DOT_DTYPE: tl.constexpr,
):
    """A[rows, k_start:k_end] @ W[offs_n, k_start:k_end].T -> [BLOCK_M, BLOCK_N] float32.

    Each step loads a [BLOCK_N, BLOCK_K/8] tile of packed words (contiguous along K: coalesced, every
    word once), unpacks it in registers to [BLOCK_N, BLOCK_K] and scales it per group. k_start must be a
    multiple of GROUP (callers split K in multiples of BLOCK_K).
    """
    tl.static_assert(BLOCK_K % GROUP == 0)
    offs_k = tl.arange(0, BLOCK_K)
    offs_kw = tl.arange(0, BLOCK_K // _PACK)
    offs_g = tl.arange(0, BLOCK_K // GROUP)
    shifts = (tl.arange(0, _PACK) * _BITS)[None, None, :]                         # nibble j of a word is k = 8w + j
    if BLOCK_M == 1:
        acc = tl.zeros((BLOCK_N, BLOCK_K), dtype=tl.float32)    # reduced over K once, after the loop
    else:
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
    for k0 in range(k_start, k_end, BLOCK_K):
        kw = k0 // _PACK + offs_kw
        words = tl.load(w_ptr + offs_n[:, None] * stride_wn + kw[None, :] * stride_wk,
                        mask=n_mask[:, None] & (kw < k_end // _PACK)[None, :], other=0)
        q = ((words[:, :, None] >> shifts) & _MASK) - _OFFSET                         # [BLOCK_N, BLOCK_K/8, 8]
        g = k0 // GROUP + offs_g
        s = tl.load(s_ptr + offs_n[:, None] * stride_sn + g[None, :] * stride_sk,
                    mask=n_mask[:, None] & (g * GROUP < k_end)[None, :], other=0).to(tl.float32)
        w = tl.reshape(tl.reshape(q.to(tl.float32), (BLOCK_N, BLOCK_K // GROUP, GROUP)) * s[:, :, None],
                       (BLOCK_N, BLOCK_K))                                         # q * scale: exact in float32
        k = k0 + offs_k
        a = tl.load(a_rows[:, None] + k[None, :] * stride_ak, mask=a_mask[:, None] & (k < k_end)[None, :], other=0)
        if BLOCK_M == 1:   # GEMV for decode: elementwise products, no tensor cores
            acc += w * a.to(tl.float32)
        elif DOT_DTYPE == tl.float32:   # float32 activations: true fp32 products, not TF32
            acc = tl.dot(a.to(tl.float32), tl.trans(w), acc, input_precision="ieee")
        else:   # rounding w to the operand dtype is exactly the reference's dequantize(..., x.dtype)
            acc = tl.dot(a.to(DOT_DTYPE), tl.trans(w.to(DOT_DTYPE)), acc)
    if BLOCK_M == 1:
        return tl.sum(acc, axis=1)[None, :]
    else:
        return acc


@triton.jit
def w4a16_matmul_kernel(
    # pointers
    x_ptr, w_ptr, s_ptr, out_ptr,
    # sizes
    M, N, K, K_PER_SPLIT,
    # strides
    stride_xm, stride_xk, stride_wn, stride_wk, stride_sn, stride_sk, stride_os, stride_om, stride_on,
    # constexprs
    GROUP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr,
    GROUP_M: tl.constexpr, DOT_DTYPE: tl.constexpr,
):
    pid, pid_k = tl.program_id(0), tl.program_id(1)
    # Grouped ordering: GROUP_M row tiles walk the same weight columns together, so a weight tile
    # read from DRAM is reused from L2 by the neighbouring row tiles.
    num_m, num_n = tl.cdiv(M, BLOCK_M), tl.cdiv(N, BLOCK_N)
    width = GROUP_M * num_n
    first_m = (pid // width) * GROUP_M
    group_rows = tl.minimum(num_m - first_m, GROUP_M)
    pid_m = first_m + (pid % width) % group_rows
    pid_n = (pid % width) // group_rows

    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    k_start = pid_k * K_PER_SPLIT
    k_end = tl.minimum(K, k_start + K_PER_SPLIT)
    acc = int4_tile_matmul(x_ptr + offs_m.to(tl.int64) * stride_xm, w_ptr, s_ptr, offs_m < M, offs_n, offs_n < N, k_start, k_end,
                           stride_xk, stride_wn, stride_wk, stride_sn, stride_sk,
                           GROUP, BLOCK_M, BLOCK_N, BLOCK_K, DOT_DTYPE)
    out = out_ptr + pid_k * stride_os + offs_m.to(tl.int64)[:, None] * stride_om + offs_n[None, :] * stride_on
    tl.store(out, acc.to(out_ptr.dtype.element_ty), mask=(offs_m < M)[:, None] & (offs_n < N)[None, :])


# ------------------------------------------------------------------------------------------ configs
# Keyed on M (first row with max_m >= M wins). The rows for M = 1, 16 and 4096 were tuned on an H200
# with benchmarks/tune_int4.py at [18432 x 7168] (bf16, 2026-12-04); 64 and 256 are untuned.
#   (max_m, BLOCK_M, BLOCK_N, BLOCK_K, GROUP_M, num_warps, num_stages)
W4A16_CONFIGS = [
    (1, 1, 8, 512, 1, 4, 3),             # decode GEMV: N/8 programs stream 8 rows each (78 us)
    (16, 16, 32, 256, 1, 4, 3),          # small batch: one row tile, split-K fills the SMs (112 us)
    (64, 64, 64, 128, 8, 4, 4),
    (256, 64, 128, 64, 8, 4, 4),
    (math.inf, 128, 128, 64, 8, 4, 4),   # prefill: compute bound, dequant amortized over 128 rows (3.8 ms)
]
# Before Hopper the mma.sync accumulators of a 128x128 tile on 4 warps spill inside the loop (aot --arch 80):
# 8 warps halve each thread's share. Untimed.
W4A16_PRE_HOPPER_CONFIGS = W4A16_CONFIGS[:-1] + [(math.inf, 128, 128, 64, 8, 8, 3)]
# Under TRITON_INTERPRET every program is Python: few, large tiles (autotuning would only cost time).
W4A16_INTERPRET_CONFIGS = [
    (1, 1, 32, 64, 1, 1, 1),
    (math.inf, 32, 32, 64, 2, 1, 1),
]
# What launch heuristics assume of the GPU when the tensors are on the CPU (the interpreter, or
# kernels.aot compiling for a target it sets here): few SMs, so small test shapes still exercise split-K.
CPU_STAND_IN = {"sms": 4, "capability": (9, 0)}


def is_interpreted(kernel) -> bool:
    """True when `kernel` runs in the Triton interpreter (TRITON_INTERPRET=1 when triton.jit wrapped it)."""
    return type(kernel).__name__ == "InterpretedFunction"


@functools.lru_cache(maxsize=None)
def _num_sms(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def num_sms(device: torch.device) -> int:
    if device.type != "cuda":
        return CPU_STAND_IN["sms"]
    return _num_sms(torch.cuda.current_device() if device.index is None else device.index)


def capability(device: torch.device) -> tuple[int, int]:
    """The device's compute capability, (9, 0) for Hopper."""
    if device.type != "cuda":
        return CPU_STAND_IN["capability"]
    return torch.cuda.get_device_capability(device)


def dot_dtype(dtype: torch.dtype, interpreted: bool):
    """tl.dot operand dtype: float32 under the interpreter (its bf16 dot multiplies raw bits), else x's."""
    if interpreted:
        return tl.float32
    return {torch.bfloat16: tl.bfloat16, torch.float16: tl.float16, torch.float32: tl.float32}[dtype]


def split_k(tiles: int, K: int, block_k: int, device: torch.device) -> tuple[int, int]:
    """(splits, K per split): split K only when the output tiles alone leave SMs idle."""
    sms = num_sms(device)
    chunks = triton.cdiv(K, block_k)
    splits = 1 if tiles >= sms else min(triton.cdiv(2 * sms, tiles), chunks)
    k_per_split = triton.cdiv(chunks, splits) * block_k
    return triton.cdiv(K, k_per_split), k_per_split


def check_int4_weight(prefix: str, packed: torch.Tensor, scale: torch.Tensor, K: int, group_size: int) -> None:
    """Raise naming the argument (`{prefix}packed`, `{prefix}scale`) unless they hold [..., N, K] at group_size."""
    if packed.dtype != torch.int32:
        raise TypeError(f"{prefix}packed must be int32, got {packed.dtype}")
    if not scale.dtype.is_floating_point:
        raise TypeError(f"{prefix}scale must be a float tensor, got {scale.dtype}")
    if packed.shape[-1] * PACK_FACTOR != K:
        raise ValueError(f"{prefix}packed {tuple(packed.shape)} holds {packed.shape[-1] * PACK_FACTOR} inputs per row, "
                         f"the activations have K={K}")
    if group_size < PACK_FACTOR or group_size & (group_size - 1) or K % group_size:
        raise ValueError(f"group_size {group_size} must be a power of two >= {PACK_FACTOR} dividing K={K}")
    if scale.shape != (*packed.shape[:-1], K // group_size):
        raise ValueError(f"{prefix}scale {tuple(scale.shape)} does not match {prefix}packed {tuple(packed.shape)} "
                         f"with group_size {group_size}: expected {(*packed.shape[:-1], K // group_size)}")


# ------------------------------------------------------------------------------------------ wrapper
def w4a16_matmul(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor, group_size: int = GROUP_SIZE) -> torch.Tensor:
    """x [M, K] (bf16 / fp16 / fp32) @ INT4 weight (packed int32 [N, K/8], scale [N, K/G]).T -> [M, N] in x.dtype.

    Reads the checkpoint layout directly (no repacking). Accumulates in float32; with split-K the
    partial sums are added in float32 before the single rounding to x.dtype. The tl.dot body rounds
    the dequantized weight to x.dtype as the reference does; the GEMV body (M = 1) keeps q * scale
    exact in float32, so at bf16 it is slightly closer to the true product than the reference.
    """
    if x.dim() != 2 or x.dtype not in (torch.bfloat16, torch.float16, torch.float32):
        raise TypeError(f"x must be a 2-D bf16/fp16/fp32 tensor, got {x.dtype} {tuple(x.shape)}")
    if packed.dim() != 2:
        raise ValueError(f"packed must be [N, K/8], got {tuple(packed.shape)}")
    M, K = x.shape
    N = packed.shape[0]
    check_int4_weight("", packed, scale, K, group_size)
    if not (x.device == packed.device == scale.device):
        raise ValueError(f"x, packed and scale must share a device, got {x.device}, {packed.device}, {scale.device}")
    if M == 0 or N == 0:
        return x.new_zeros(M, N)

    interpreted = is_interpreted(w4a16_matmul_kernel)
    table = (W4A16_INTERPRET_CONFIGS if interpreted else W4A16_CONFIGS if capability(x.device) >= (9, 0)
             else W4A16_PRE_HOPPER_CONFIGS)
    _, block_m, block_n, block_k, group_m, num_warps, num_stages = next(c for c in table if M <= c[0])
    block_k = max(block_k, group_size)      # a K step covers whole scale groups
    tiles = triton.cdiv(M, block_m) * triton.cdiv(N, block_n)
    splits, k_per_split = split_k(tiles, K, block_k, x.device)
    out = torch.empty(splits, M, N, dtype=x.dtype if splits == 1 else torch.float32, device=x.device)

    grid = lambda meta: (triton.cdiv(M, meta["BLOCK_M"]) * triton.cdiv(N, meta["BLOCK_N"]), splits)
    w4a16_matmul_kernel[grid](
        x, packed, scale, out,
        M, N, K, k_per_split,
        x.stride(0), x.stride(1), packed.stride(0), packed.stride(1), scale.stride(0), scale.stride(1),
        out.stride(0), out.stride(1), out.stride(2),
        GROUP=group_size, BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_K=block_k, GROUP_M=group_m,
        DOT_DTYPE=dot_dtype(x.dtype, interpreted), num_warps=num_warps, num_stages=num_stages,
    )
    return out[0] if splits == 1 else out.sum(0).to(x.dtype)
