"""INT4 matmuls on the CPU through torch's own group-quantized INT4 kernel.

The reference path dequantizes every expert a token touches, on every call; on a CPU that costs
more than the matmul itself. torch ships a CPU kernel for the tinygemm INT4 format
(torch._weight_int4pack_mm_for_cpu: w = (nibble - 8) * scale + zero per group), which is Kimi's
format with zero = 0, so it computes the same weights exactly, in float32 or bf16 arithmetic. It
reads its own weight layout: each stacked expert tensor is converted on first use and kept beside
the checkpoint-layout one (the same packed bytes again, plus scales in the activation dtype), tied to
that tensor's identity and version, so a weight updated in place is converted again. In float32 the
kernel only pays off for single rows (see _matmul), so float32 prefill keeps the reference.
"""

from __future__ import annotations

import weakref

import torch
import torch.nn.functional as F

from .int4 import NIBBLE_OFFSET, PACK_FACTOR, dequantize, unpack
from .kernels.moe import moe_loop_ref

GROUP_SIZES = (32, 64, 128, 256)     # what the kernel accepts
FLOAT32_MAX_ROWS = 0                 # float32 never takes the kernel: at hidden 2048 it reads INT4 at ~0.13 GB/s (bf16 ~6.5)
ROW_MULTIPLE = 16                    # output rows per weight must be a multiple of this
DTYPES = (torch.float32, torch.bfloat16, torch.float16)

# id(packed weight) -> (what it was converted from: packed and scale states, activation dtype; the converted
# weights, one (weight, group, scales) per matrix). Keyed by id, not by the tensor (tensors compare
# elementwise); an entry leaves with its tensor.
_cache: dict[int, tuple[tuple, list]] = {}


def available() -> bool:
    return hasattr(torch, "_weight_int4pack_mm_for_cpu") and hasattr(torch, "_convert_weight_to_int4pack_for_cpu")


def supported(x: torch.Tensor, *weights: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether x @ each (packed [..., N, K/8], scale [..., N, K/G]) weight can run here."""
    if x.device.type != "cpu" or x.dtype not in DTYPES or not available():
        return False
    if torch.is_grad_enabled() and x.requires_grad:    # the kernel has no backward
        return False
    for packed, scale in weights:
        K = packed.shape[-1] * PACK_FACTOR
        if packed.shape[-2] % ROW_MULTIPLE or scale.shape[-1] == 0 or K // scale.shape[-1] not in GROUP_SIZES:
            return False
    return True


def _convert(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> tuple[torch.Tensor, int, torch.Tensor]:
    """One matrix: (packed [N, K/8], scale [N, K/G]) -> (kernel weight, group size, scales_and_zeros [K/G, N, 2])."""
    nibbles = unpack(packed).to(torch.int32) + NIBBLE_OFFSET                      # [N, K] in 0..15
    weight = torch._convert_weight_to_int4pack_for_cpu(nibbles, 1)
    scales = scale.to(dtype).t()
    return weight, packed.shape[-1] * PACK_FACTOR // scale.shape[-1], torch.stack([scales, torch.zeros_like(scales)], -1)


def _state(t: torch.Tensor) -> tuple:
    """What identifies a tensor's contents: its storage and version (inference tensors have no version
    counter, and cannot be changed in place outside inference mode)."""
    return id(t), t.data_ptr(), 0 if t.is_inference() else t._version


def converted(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> list:
    """The kernel's layout of a weight ([N, K/8]) or a stack of them ([E, N, K/8]), cached."""
    key = (_state(packed), _state(scale), dtype)
    hit = _cache.get(id(packed))
    if hit is not None and hit[0] == key:
        return hit[1]
    if hit is None:
        weakref.finalize(packed, _cache.pop, id(packed), None)
    matrices = [_convert(p, s, dtype) for p, s in zip(packed.reshape(-1, *packed.shape[-2:]),
                                                       scale.reshape(-1, *scale.shape[-2:]))]
    _cache[id(packed)] = (key, matrices)
    return matrices


def _matmul(x: torch.Tensor, weight: tuple) -> torch.Tensor:
    """x [M, K] @ one weight given as (converted, packed [N, K/8], scale [N, K/G]) -> [M, N] in x.dtype.

    In float32 the kernel works row by row: measured against dequantize + matmul it is 2x faster
    for one row and 4x slower for eight, so more rows take the reference. bf16/fp16 always win
    (8-20x at 1 to 256 rows)."""
    kernel_weight, packed, scale = weight
    if x.dtype == torch.float32 and x.shape[0] > FLOAT32_MAX_ROWS:
        return F.linear(x, dequantize(packed, scale, x.dtype))
    return torch._weight_int4pack_mm_for_cpu(x.contiguous(), *kernel_weight)


def linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ INT4 weight (packed [N, K/8], scale [N, K/G]).T -> [M, N]; as w4a16_matmul_ref."""
    return _matmul(x, (converted(packed, scale, x.dtype)[0], packed, scale))


def moe(x, gate_up_packed, gate_up_scale, down_packed, down_scale, topk_weights, topk_ids) -> torch.Tensor:
    """Routed INT4 experts, x [T, D] -> [T, D]: moe_loop_ref with each expert's matmuls on the INT4 kernel."""
    gate_up = converted(gate_up_packed, gate_up_scale, x.dtype)
    down = converted(down_packed, down_scale, x.dtype)

    def expert(e: int):
        return (gate_up[e], gate_up_packed[e], gate_up_scale[e]), (down[e], down_packed[e], down_scale[e])
    return moe_loop_ref(x, expert, topk_weights, topk_ids, linear=_matmul)
