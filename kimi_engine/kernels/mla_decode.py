"""Split-KV (flash-decoding) MLA attention over the paged latent cache, in the absorbed form.

Each query row q attends to tokens 0 .. seq_lens[q]-1 of its sequence. Token t lives at
kv_cache[block_table[q, t // block_size], t % block_size]: C latent values (the key against
q_latent and also the value) then R roped key values shared by every head.

Kernel design, for an H100 at Kimi dims (H=64, C=512, R=64, bf16: 1152 bytes per token per layer).
Decode is a stream over the cache, so the target is to read each KV byte from HBM once per query:
- Stage 1, grid (head blocks, splits, queries): a program takes BLOCK_H heads of one query and one
  contiguous range of its tokens (a split), streams that range BLOCK_N tokens at a time through the
  block table, and keeps an online softmax and a [BLOCK_H, C] float32 accumulator. The latent tile is
  loaded once and used twice: transposed as keys (q_latent @ latent^T) and as values (p @ latent).
- BLOCK_H = 64 (all of Kimi's heads), so a KV tile is fetched once for every head. The accumulator is
  then 64 x 512 float32 = 128 KB, half the register file: with 8 warps, 128 registers a thread. It fits
  because Triton keeps the loop-invariant q (64 x 576 bf16 = 72 KB) in shared memory as the wgmma A
  operand. Splitting C between two programs would halve the accumulator but make both compute all
  the scores and read every key twice; smaller head blocks read every KV tile H / BLOCK_H times (from
  L2 at best) and, below 64 rows, Triton drops from wgmma to mma.sync. With H < 64 (tensor parallel)
  BLOCK_H shrinks to the head count (>= 16 for tl.dot); H > 64 takes several head blocks, the fastest
  grid axis, so siblings reading the same tiles run together and the second read hits L2.
- BLOCK_N = 32: a [32, 576] bf16 tile is 36 KB, so q plus two pipeline stages take 144 KB of shared
  memory. Compiled ahead of time for sm_90 (`python -m kimi_engine.kernels.aot`, no GPU): 255
  registers, no spill inside the loop, wgmma, cp.async pipelining; BLOCK_N = 64 (216 KB) and three
  stages both spill. One 8-warp CTA per SM. An fp8 cache takes 32-head blocks (see the config tables).
- Splits: enough to fill the SMs (queries x head blocks x splits >= SM count), but no split shorter
  than MIN_SPLIT_TOKENS: each split writes a float32 [H, C] partial (128 KB at Kimi dims), which must
  stay small beside the KV it summarizes. A query's tokens are spread evenly over all splits (rounded
  to BLOCK_N), so in a batch of unequal lengths a short sequence leaves its last splits empty.
- Stage 2, grid (heads, queries): merges the splits by their log-sum-exp (base 2), skipping empty ones.
fp8 (e4m3) caches carry per-token scales; they are folded into the scores and into p instead of
rescaling every loaded element (exact up to rounding: the scale is constant along C).
"""

from __future__ import annotations

import math

import torch
import triton
import triton.language as tl

from .w4a16 import capability, dot_dtype, is_interpreted, num_sms

LOG2E = 1.4426950408889634           # scores are scaled by log2(e) so the softmax uses exp2
MIN_DOT = 16                         # tl.dot needs every dimension >= 16
MIN_SPLIT_TOKENS = 512               # a split's [H, C] fp32 partial stays <~20% of its KV bytes
REF_TILE_TOKENS = 4096               # the reference attends this many tokens at a time
KV_DTYPES = (torch.bfloat16, torch.float16, torch.float32, torch.float8_e4m3fn)
Q_DTYPES = (torch.bfloat16, torch.float16, torch.float32)

# (max heads, BLOCK_H, BLOCK_N, num_warps, num_stages): the first row with max heads >= H. Checked with
# `python -m kimi_engine.kernels.aot` (sm_90, C=512, R=64, bf16 q): no spill inside the loop, wgmma at 64
# heads (255 regs; 32 B spilled in the prologue/epilogue only; 145 KB smem), mma.sync below.
MLA_DECODE_CONFIGS = [
    (16, 16, 32, 4, 3),
    (32, 32, 64, 8, 3),
    (math.inf, 64, 32, 8, 2),
]
# Before Hopper there is no wgmma to keep a 64-row head block worth its registers: 16-token tiles keep
# the loop spill-free on sm_80 (aot --arch 80: 246 regs, 92 KB smem).
MLA_DECODE_PRE_HOPPER_CONFIGS = [
    (16, 16, 32, 4, 3),
    (32, 32, 64, 8, 3),
    (math.inf, 64, 16, 8, 2),
]
# An fp8 cache converts each tile in registers before the dot: at 64-head blocks that spills inside the
# loop (86 spill loads/stores), so fp8 takes 32-head blocks with 8 warps (sibling head blocks are the
# fastest grid axis: the second read of a KV tile comes from L2). None spills.
MLA_DECODE_FP8_CONFIGS = [
    (16, 16, 32, 8, 3),
    (math.inf, 32, 32, 8, 3),
]
# The interpreter runs on numpy: big tiles mean fewer interpreted steps.
MLA_DECODE_INTERPRET_CONFIGS = [(math.inf, 16, 64, 1, 1)]
MERGE_NUM_WARPS = 4


FP8_KV_MIN_CAPABILITY = (8, 9)       # Triton converts e4m3 (fp8e4nv) on Ada, Hopper and newer only


def check_fp8_kv_device(device: torch.device) -> None:
    """ValueError unless the kernel can read an fp8 (e4m3) cache on `device` (any non-CUDA device can:
    there the reference or the interpreter runs)."""
    if device.type == "cuda":
        capability = torch.cuda.get_device_capability(device)
        if capability < FP8_KV_MIN_CAPABILITY:
            raise ValueError(f"an fp8 (e4m3) KV cache needs compute capability >= 8.9 (Ada, Hopper); {device} is "
                             f"{capability[0]}.{capability[1]}: use a bf16 cache (kv_fp8=False) or "
                             "KIMI_ENGINE_KERNELS=torch")


def dequantize_kv(kv: torch.Tensor, kv_scale: torch.Tensor | None, C: int) -> torch.Tensor:
    """Rows of the cache [..., C + R] -> float32; fp8 rows times their scales [..., 2] (latent, rope)."""
    kv = kv.float()
    if kv_scale is None:
        return kv
    return torch.cat([kv[..., :C] * kv_scale[..., :1], kv[..., C:] * kv_scale[..., 1:]], dim=-1)


def mla_decode_ref(q_latent, q_rope, kv_cache, block_table, seq_lens, softmax_scale, kv_scale=None):
    """Attention of each query row over its paged sequence -> [Q, H, C] in q_latent's dtype.

    q_latent [Q, H, C], q_rope [Q, H, R]; kv_cache [num_blocks, block_size, C + R] (latent, then roped
    key), dequantized by kv_scale [num_blocks, block_size, 2] when fp8; query i attends to tokens
    0 .. seq_lens[i]-1, token t at kv_cache[block_table[i, t // block_size], t % block_size].
    scores = (q_latent . latent + q_rope . k_rope) * softmax_scale; out = softmax(scores) @ latent.
    One query at a time, REF_TILE_TOKENS tokens at a time, merged with an online (log-sum-exp)
    softmax, so memory stays O(H x tile) at any context length. Everything in float32.
    """
    Q, H, C = q_latent.shape
    block_size = kv_cache.shape[1]
    out = torch.empty_like(q_latent)
    for i, n in enumerate(seq_lens.tolist()):
        ql, qr = q_latent[i].float(), q_rope[i].float()                      # [H, C], [H, R]
        m = torch.full((H,), float("-inf"), device=q_latent.device)
        l = torch.zeros(H, device=q_latent.device)
        acc = torch.zeros(H, C, device=q_latent.device)
        for t0 in range(0, n, REF_TILE_TOKENS):
            t = torch.arange(t0, min(t0 + REF_TILE_TOKENS, n), device=kv_cache.device)
            blocks, slots = block_table[i, t // block_size].long(), t % block_size
            kv = dequantize_kv(kv_cache[blocks, slots], None if kv_scale is None else kv_scale[blocks, slots], C)
            latent, k_rope = kv[:, :C], kv[:, C:]                              # [n, C], [n, R]
            s = (ql @ latent.T + qr @ k_rope.T) * softmax_scale                # [H, n]
            m_new = torch.maximum(m, s.amax(-1))
            alpha, p = torch.exp(m - m_new), torch.exp(s - m_new[:, None])
            l, acc, m = l * alpha + p.sum(-1), acc * alpha[:, None] + p @ latent, m_new
        out[i] = (acc / l[:, None]).to(out.dtype)
    return out


# ------------------------------------------------------------------------------------------ kernels
@triton.jit
def mla_decode_kernel(
    # pointers
    q_latent_ptr, q_rope_ptr, kv_ptr, kv_scale_ptr, block_table_ptr, seq_lens_ptr, part_out_ptr, part_lse_ptr,
    # sizes
    H, num_splits, qk_scale,
    # strides
    stride_ql_q, stride_ql_h, stride_ql_c, stride_qr_q, stride_qr_h, stride_qr_r,
    stride_kv_b, stride_kv_t, stride_kv_d, stride_ks_b, stride_ks_t, stride_ks_k,
    stride_bt_q, stride_bt_b,
    stride_po_q, stride_po_h, stride_po_s, stride_po_c, stride_pl_q, stride_pl_h, stride_pl_s,
    # constexprs
    C: tl.constexpr, R: tl.constexpr, BLOCK_C: tl.constexpr, BLOCK_R: tl.constexpr,
    BLOCK_SIZE: tl.constexpr, KV_FP8: tl.constexpr,
    BLOCK_H: tl.constexpr, BLOCK_N: tl.constexpr, DOT_DTYPE: tl.constexpr, PRECISION: tl.constexpr,
):
    """Stage 1: one (head block, split, query) -> normalized partial out [BLOCK_H, C], lse (base 2)."""
    split = tl.program_id(1)
    q = tl.program_id(2).to(tl.int64)
    seq_len = tl.load(seq_lens_ptr + q)
    split_len = tl.cdiv(tl.cdiv(seq_len, num_splits), BLOCK_N) * BLOCK_N
    start = split * split_len
    end = tl.minimum(start + split_len, seq_len)               # start >= end: an empty split

    offs_h = tl.program_id(0) * BLOCK_H + tl.arange(0, BLOCK_H)
    offs_c, offs_r = tl.arange(0, BLOCK_C), tl.arange(0, BLOCK_R)
    mask_h, mask_c, mask_r = offs_h < H, offs_c < C, offs_r < R
    q_lat = tl.load(q_latent_ptr + q * stride_ql_q + offs_h[:, None] * stride_ql_h + offs_c[None, :] * stride_ql_c,
                    mask=mask_h[:, None] & mask_c[None, :], other=0.0).to(DOT_DTYPE)        # [BLOCK_H, BLOCK_C]
    q_rot = tl.load(q_rope_ptr + q * stride_qr_q + offs_h[:, None] * stride_qr_h + offs_r[None, :] * stride_qr_r,
                    mask=mask_h[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)        # [BLOCK_H, BLOCK_R]

    m = tl.full([BLOCK_H], float("-inf"), tl.float32)          # running max of the scores (log2 units)
    l = tl.zeros([BLOCK_H], tl.float32)                        # running sum of exp2(score - m)
    acc = tl.zeros([BLOCK_H, BLOCK_C], tl.float32)
    for n0 in range(start, end, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        valid = offs_n < end
        # Masked: block-table entries past the sequence are never read.
        block = tl.load(block_table_ptr + q * stride_bt_q + (offs_n // BLOCK_SIZE) * stride_bt_b, mask=valid, other=0)
        block, slot = block.to(tl.int64), offs_n % BLOCK_SIZE
        rows = kv_ptr + block * stride_kv_b + slot * stride_kv_t                           # [BLOCK_N]
        latent = tl.load(rows[:, None] + offs_c[None, :] * stride_kv_d,
                         mask=valid[:, None] & mask_c[None, :], other=0.0).to(DOT_DTYPE)    # [BLOCK_N, BLOCK_C]
        k_rot = tl.load(rows[:, None] + (C + offs_r)[None, :] * stride_kv_d,
                        mask=valid[:, None] & mask_r[None, :], other=0.0).to(DOT_DTYPE)     # [BLOCK_N, BLOCK_R]
        s_lat = tl.dot(q_lat, tl.trans(latent), input_precision=PRECISION)                 # [BLOCK_H, BLOCK_N]
        s_rot = tl.dot(q_rot, tl.trans(k_rot), input_precision=PRECISION)
        if KV_FP8:
            scales = kv_scale_ptr + block * stride_ks_b + slot * stride_ks_t
            scale_lat = tl.load(scales, mask=valid, other=0.0)
            scale_rot = tl.load(scales + stride_ks_k, mask=valid, other=0.0)
            s = s_lat * scale_lat[None, :] + s_rot * scale_rot[None, :]
        else:
            s = s_lat + s_rot
        s = tl.where(valid[None, :], s * qk_scale, float("-inf"))
        m_new = tl.maximum(m, tl.max(s, axis=1))               # finite: every tile has a valid token
        alpha = tl.exp2(m - m_new)
        p = tl.exp2(s - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        if KV_FP8:
            p = p * scale_lat[None, :]                         # the value is latent x scale_lat
        acc = acc * alpha[:, None] + tl.dot(p.to(DOT_DTYPE), latent, input_precision=PRECISION)
        m = m_new

    nonempty = l > 0
    l_safe = tl.where(nonempty, l, 1.0)
    po = part_out_ptr + q * stride_po_q + offs_h[:, None] * stride_po_h + split * stride_po_s + offs_c[None, :] * stride_po_c
    tl.store(po, acc / l_safe[:, None], mask=(mask_h & nonempty)[:, None] & mask_c[None, :])
    lse = tl.where(nonempty, m + tl.log2(l_safe), float("-inf"))
    tl.store(part_lse_ptr + q * stride_pl_q + offs_h * stride_pl_h + split * stride_pl_s, lse, mask=mask_h)


@triton.jit
def mla_merge_kernel(
    # pointers
    part_out_ptr, part_lse_ptr, out_ptr,
    # sizes
    num_splits,
    # strides
    stride_po_q, stride_po_h, stride_po_s, stride_po_c, stride_pl_q, stride_pl_h, stride_pl_s,
    stride_o_q, stride_o_h, stride_o_c,
    # constexprs
    C: tl.constexpr, BLOCK_C: tl.constexpr,
):
    """Stage 2: one (head, query) -> out [C] = sum_s w_s partial_s, w_s = 2^lse_s / sum 2^lse."""
    h = tl.program_id(0).to(tl.int64)
    q = tl.program_id(1).to(tl.int64)
    offs_c = tl.arange(0, BLOCK_C)
    mask_c = offs_c < C
    po = part_out_ptr + q * stride_po_q + h * stride_po_h + offs_c * stride_po_c
    pl = part_lse_ptr + q * stride_pl_q + h * stride_pl_h
    # Split 0 always holds token 0, so starting from it keeps the running max finite.
    m = tl.load(pl)
    denom = 1.0
    acc = tl.load(po, mask=mask_c, other=0.0)
    for s in range(1, num_splits):
        lse = tl.load(pl + s * stride_pl_s)
        m_new = tl.maximum(m, lse)
        alpha, w = tl.exp2(m - m_new), tl.exp2(lse - m_new)    # w = 0 for an empty split (lse = -inf)
        width = tl.where(lse > float("-inf"), C, 0)            # an empty split's partial is never read
        part = tl.load(po + s * stride_po_s, mask=offs_c < width, other=0.0)
        acc = acc * alpha + w * part
        denom = denom * alpha + w
        m = m_new
    tl.store(out_ptr + q * stride_o_q + h * stride_o_h + offs_c * stride_o_c, (acc / denom).to(out_ptr.dtype.element_ty),
             mask=mask_c)


# ------------------------------------------------------------------------------------------ wrapper
def pick_config(H: int, interpreted: bool, kv_fp8: bool = False, hopper: bool = True) -> tuple[int, int, int, int]:
    """(BLOCK_H, BLOCK_N, num_warps, num_stages) for H heads over a bf16/fp16/fp32 or an fp8 cache."""
    table = (MLA_DECODE_INTERPRET_CONFIGS if interpreted else MLA_DECODE_FP8_CONFIGS if kv_fp8
             else MLA_DECODE_CONFIGS if hopper else MLA_DECODE_PRE_HOPPER_CONFIGS)
    _, block_h, block_n, num_warps, num_stages = next(c for c in table if H <= c[0])
    return max(MIN_DOT, min(block_h, triton.next_power_of_2(H))), block_n, num_warps, num_stages


def choose_num_splits(max_len: int, Q: int, head_blocks: int, device: torch.device) -> int:
    """Splits per query: fill the SMs with Q x head_blocks x splits programs, no split under MIN_SPLIT_TOKENS."""
    fill = triton.cdiv(num_sms(device), Q * head_blocks)
    return max(1, min(fill, triton.cdiv(max_len, MIN_SPLIT_TOKENS)))


def _check(q_latent, q_rope, kv_cache, block_table, seq_lens, kv_scale) -> None:
    if q_latent.dim() != 3 or q_latent.dtype not in Q_DTYPES:
        raise TypeError(f"q_latent must be a [Q, H, C] bf16/fp16/fp32 tensor, got {q_latent.dtype} {tuple(q_latent.shape)}")
    Q, H, C = q_latent.shape
    if q_rope.dim() != 3 or q_rope.shape[:2] != (Q, H) or q_rope.dtype != q_latent.dtype:
        raise ValueError(f"q_rope must be [Q={Q}, H={H}, R] in {q_latent.dtype}, got {q_rope.dtype} {tuple(q_rope.shape)}")
    R = q_rope.shape[2]
    if kv_cache.dim() != 3 or kv_cache.shape[2] != C + R or kv_cache.dtype not in KV_DTYPES:
        raise ValueError(f"kv_cache must be [num_blocks, block_size, C + R = {C + R}] in one of {KV_DTYPES}, "
                         f"got {kv_cache.dtype} {tuple(kv_cache.shape)}")
    block_size = kv_cache.shape[1]
    if block_size < MIN_DOT or block_size & (block_size - 1):
        raise ValueError(f"kv_cache block_size must be a power of two >= {MIN_DOT}, got {block_size}")
    if kv_cache.stride(2) != 1:
        raise ValueError(f"kv_cache must be contiguous in its last dim, got strides {kv_cache.stride()}")
    is_fp8 = kv_cache.dtype == torch.float8_e4m3fn
    if is_fp8 != (kv_scale is not None):
        raise ValueError(f"kv_scale must be given exactly when kv_cache is float8_e4m3fn (kv_cache is {kv_cache.dtype})")
    if is_fp8:
        check_fp8_kv_device(kv_cache.device)
    if is_fp8 and (kv_scale.shape != (*kv_cache.shape[:2], 2) or kv_scale.dtype != torch.float32):
        raise ValueError(f"kv_scale must be float32 [{kv_cache.shape[0]}, {block_size}, 2], "
                         f"got {kv_scale.dtype} {tuple(kv_scale.shape)}")
    if block_table.dim() != 2 or block_table.shape[0] != Q or block_table.dtype != torch.int32:
        raise ValueError(f"block_table must be int32 [Q={Q}, max_blocks], got {block_table.dtype} {tuple(block_table.shape)}")
    if seq_lens.shape != (Q,) or seq_lens.dtype != torch.int32:
        raise ValueError(f"seq_lens must be int32 [Q={Q}], got {seq_lens.dtype} {tuple(seq_lens.shape)}")
    tensors = [q_latent, q_rope, kv_cache, block_table, seq_lens] + ([kv_scale] if is_fp8 else [])
    if len({t.device for t in tensors}) != 1:
        raise ValueError(f"all tensors must share a device, got {[str(t.device) for t in tensors]}")
    if Q > 65535:
        raise ValueError(f"at most 65535 query rows per call (the grid's third axis), got Q={Q}")


def mla_decode(q_latent, q_rope, kv_cache, block_table, seq_lens, softmax_scale, kv_scale=None, num_splits=None,
               max_seq_len=None):
    """Paged MLA attention, as mla_decode_ref -> [Q, H, C] in q_latent's dtype.

    q_latent [Q, H, C], q_rope [Q, H, R] (same float dtype); kv_cache [num_blocks, block_size, C + R]
    (bf16/fp16/fp32, or float8_e4m3fn with kv_scale float32 [num_blocks, block_size, 2]); block_table
    int32 [Q, max_blocks]; seq_lens int32 [Q], each >= 1. Scores, softmax and the output sums are
    float32; tl.dot takes q's dtype (the cache is converted to it on load). With num_splits=None the
    split count is derived from max_seq_len, a host-side bound on seq_lens (a fixed one under CUDA
    graphs), or without it from seq_lens.max(), one host sync that also range-checks seq_lens.
    """
    _check(q_latent, q_rope, kv_cache, block_table, seq_lens, kv_scale)
    Q, H, C = q_latent.shape
    R = q_rope.shape[2]
    out = torch.empty(Q, H, C, dtype=q_latent.dtype, device=q_latent.device)
    if Q == 0:
        return out
    interpreted = is_interpreted(mla_decode_kernel)
    block_h, block_n, num_warps, num_stages = pick_config(H, interpreted, kv_scale is not None,
                                                         hopper=capability(q_latent.device) >= (9, 0))
    if num_splits is None and max_seq_len is not None:
        num_splits = choose_num_splits(max_seq_len, Q, triton.cdiv(H, block_h), q_latent.device)
    if num_splits is None:
        lo, hi = (int(v) for v in torch.aminmax(seq_lens))
        if lo < 1 or hi > block_table.shape[1] * kv_cache.shape[1]:
            raise ValueError(f"seq_lens must lie in [1, {block_table.shape[1] * kv_cache.shape[1]}] "
                             f"(block_table capacity), got [{lo}, {hi}]")
        num_splits = choose_num_splits(hi, Q, triton.cdiv(H, block_h), q_latent.device)
    if num_splits < 1:
        raise ValueError(f"num_splits must be >= 1, got {num_splits}")
    part_out = torch.empty(Q, H, num_splits, C, dtype=torch.float32, device=q_latent.device)
    part_lse = torch.empty(Q, H, num_splits, dtype=torch.float32, device=q_latent.device)
    scale = kv_scale if kv_scale is not None else part_lse     # a dummy pointer, never read
    scale_strides = kv_scale.stride() if kv_scale is not None else (0, 0, 0)
    dot = dot_dtype(q_latent.dtype, interpreted)

    grid = lambda meta: (triton.cdiv(H, meta["BLOCK_H"]), num_splits, Q)
    mla_decode_kernel[grid](
        q_latent, q_rope, kv_cache, scale, block_table, seq_lens, part_out, part_lse,
        H, num_splits, float(softmax_scale) * LOG2E,
        *q_latent.stride(), *q_rope.stride(), *kv_cache.stride(), *scale_strides, *block_table.stride(),
        *part_out.stride(), *part_lse.stride(),
        C=C, R=R, BLOCK_C=max(MIN_DOT, triton.next_power_of_2(C)), BLOCK_R=max(MIN_DOT, triton.next_power_of_2(R)),
        BLOCK_SIZE=kv_cache.shape[1], KV_FP8=kv_scale is not None,
        BLOCK_H=block_h, BLOCK_N=block_n, DOT_DTYPE=dot, PRECISION="ieee" if dot == tl.float32 else "tf32",
        num_warps=num_warps, num_stages=num_stages,
    )
    merge_grid = lambda meta: (H, Q)
    mla_merge_kernel[merge_grid](
        part_out, part_lse, out, num_splits,
        *part_out.stride(), *part_lse.stride(), *out.stride(),
        C=C, BLOCK_C=triton.next_power_of_2(C), num_warps=MERGE_NUM_WARPS,
    )
    return out
