"""The INT4 weight format, in one place: compressed-tensors "pack-quantized", symmetric, grouped.

A weight w [N, K] (out, in) is stored as
    weight_packed  int32 [N, K/8]   input column c in word c // 8, bits 4*(c % 8) .. +3, as the nibble q + 8
    weight_scale   bf16  [N, K/G]   one scale per group of G consecutive inputs (G = 32 for Kimi K2)
    weight_shape   int   [2]        [N, K]
and w[n, c] = (nibble - 8) * scale[n, c // G], q in [-8, 7]. Kimi K2 Thinking's codes use only -7..7.

Every function here accepts leading batch dimensions ([E, N, K/8] for stacked experts). These
pure-torch versions are the reference the Triton kernels are tested against.
"""

from __future__ import annotations

import torch

GROUP_SIZE = 32      # Kimi K2's group size; the format allows any multiple of 8 that divides K
PACK_FACTOR = 8      # int4 values per int32 word
NIBBLE_OFFSET = 8    # stored nibble = q + 8 (offset binary)
QMAX = 7             # symmetric range used by quantize(): q in [-7, 7], as Kimi K2's own codes

_SHIFTS = tuple(4 * i for i in range(PACK_FACTOR))


def pack(q: torch.Tensor) -> torch.Tensor:
    """int codes [..., K] in [-8, 7] (any integer dtype) -> int32 words [..., K/8]."""
    if q.dtype.is_floating_point or q.dtype == torch.bool:
        raise TypeError(f"pack: codes must be an integer tensor, got {q.dtype}")
    if q.shape[-1] % PACK_FACTOR:
        raise ValueError(f"pack: last dimension {q.shape[-1]} is not a multiple of {PACK_FACTOR}")
    if q.numel() and (q.min() < -8 or q.max() > 7):
        raise ValueError("pack: codes must lie in [-8, 7]")
    nibbles = (q.to(torch.int64) + NIBBLE_OFFSET).view(*q.shape[:-1], -1, PACK_FACTOR)
    shifts = torch.tensor(_SHIFTS, dtype=torch.int64, device=q.device)
    words = (nibbles << shifts).sum(-1)                 # in [0, 2^32): fits int64
    words = torch.where(words >= 2**31, words - 2**32, words)  # reinterpret as two's-complement int32
    return words.to(torch.int32)


def unpack(packed: torch.Tensor) -> torch.Tensor:
    """int32 words [..., K/8] -> int8 codes [..., K] in [-8, 7]."""
    if packed.dtype != torch.int32:
        raise TypeError(f"unpack: packed weights must be int32, got {packed.dtype}")
    shifts = torch.tensor(_SHIFTS, dtype=torch.int32, device=packed.device)
    nibbles = (packed.unsqueeze(-1) >> shifts) & 0xF     # arithmetic shift, then mask: sign bits drop out
    return (nibbles - NIBBLE_OFFSET).to(torch.int8).flatten(-2)


def quantize(w: torch.Tensor, group_size: int = GROUP_SIZE, scale_dtype: torch.dtype = torch.bfloat16):
    """Symmetric round-to-nearest INT4 of w [..., N, K] -> (packed int32 [..., N, K/8], scale [..., N, K/G]).

    scale = absmax(group) / 7, rounded to `scale_dtype` first so that the codes are chosen against
    the scale that will be stored: dequantize(quantize(w)) is within half a step of w.
    """
    K = w.shape[-1]
    if group_size <= 0 or group_size % PACK_FACTOR or K % group_size:
        raise ValueError(f"quantize: group_size {group_size} must be a multiple of {PACK_FACTOR} dividing K={K}")
    groups = w.float().view(*w.shape[:-1], K // group_size, group_size)
    scale = (groups.abs().amax(-1) / QMAX).to(scale_dtype)
    safe = scale.float().clamp_min(torch.finfo(torch.float32).tiny)[..., None]  # all-zero groups give q = 0
    q = torch.round(groups / safe).clamp_(-QMAX - 1, QMAX).to(torch.int8)
    return pack(q.view(w.shape)), scale


def dequantize(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """(packed int32 [..., N, K/8], scale [..., N, K/G]) -> w [..., N, K] in `dtype` (math in float32)."""
    q = unpack(packed)
    K, n_groups = q.shape[-1], scale.shape[-1]
    if packed.shape[:-1] != scale.shape[:-1] or n_groups == 0 or K % n_groups:
        raise ValueError(f"dequantize: packed {tuple(packed.shape)} and scale {tuple(scale.shape)} do not match")
    w = q.float().view(*q.shape[:-1], n_groups, K // n_groups) * scale.float()[..., None]
    return w.view(q.shape).to(dtype)
