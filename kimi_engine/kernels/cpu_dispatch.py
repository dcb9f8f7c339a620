"""When the CPU kernels (cpu.py) take an op, and the bf16 weights they read in a float32 model.

The kernels read bf16 and INT4 weights and compute in float32 whatever the activation dtype. A
model loaded with dtype=float32 holds its dense weights as float32 copies of the checkpoint's bf16:
read as such, a decode step would move twice the bytes. So the first call with such a weight
checks that it is exactly bf16 (it is, when it came from a bf16 checkpoint), keeps a bf16 copy
(tied to the weight's identity and version, like cpu_int4's converted weights) and reads that: the
same bytes as a bf16 model, the same float32 arithmetic. Memory: +50% of the dense weights; load
with dtype=bfloat16 to avoid it (the kernels' results are float32-accurate either way, bf16 only
rounds the activations between ops). A float32 weight that is not exactly bf16 runs through torch.
"""

from __future__ import annotations

import weakref

import torch

from . import cpu

ACT_DTYPES = cpu.ACT_DTYPES
# Dense products with more rows than this go to torch's GEMM (oneDNN): the kernels here stream the
# weights once for up to 4 rows at a time and compute with float32 FMAs, oneDNN blocks for registers
# and (bf16) multiplies with vdpbf16ps. Measured on the 2-core Zen 4 box, a [M, 2048] x [2048, 2048]
# product over weights cycled through 192 MB (not in cache), GFLOP/s here vs torch:
#   bf16:    M=3 61 vs 52, M=4 63 vs 68, M=5 61 vs 77, M=8 42-69 vs 101-119, M=64 79 vs 286
#   float32: M=12 76 vs 46, M=16 65 vs 60, M=20 68 vs 68, M=32 45-79 vs 82-97, M=128 121 vs 151
# (torch's float32 GEMM reads the model's float32 weights, twice the bytes).
MAX_ROWS = {torch.bfloat16: 4, torch.float32: 16}

# id(weight) -> ((id, data_ptr, version), bf16 copy or None when the weight is not exactly bf16)
_bf16: dict[int, tuple[tuple, torch.Tensor | None]] = {}


def _state(t: torch.Tensor) -> tuple:
    return id(t), t.data_ptr(), 0 if t.is_inference() else t._version


def _acts_ok(x: torch.Tensor) -> bool:
    return (x.device.type == "cpu" and x.dtype in ACT_DTYPES and not (torch.is_grad_enabled() and x.requires_grad)
            and cpu.available())


def bf16_weight(w: torch.Tensor) -> torch.Tensor | None:
    """w itself if bf16; for float32, its exact bf16 copy (cached) or None if it has none."""
    if w.dtype == torch.bfloat16:
        return w if w.is_contiguous() else None
    if w.dtype != torch.float32 or w.requires_grad and torch.is_grad_enabled():
        return None
    key = _state(w)
    hit = _bf16.get(id(w))
    if hit is not None and hit[0] == key:
        return hit[1]
    if hit is None:
        weakref.finalize(w, _bf16.pop, id(w), None)
    copy = cpu.empty_weight(w.shape, torch.bfloat16).copy_(w.detach())
    exact = bool(torch.equal(copy.float(), w))
    _bf16[id(w)] = (key, copy if exact else None)
    return copy if exact else None


def dense_rows_ok(x: torch.Tensor, rows: int | None = None) -> bool:
    """Whether a dense product of x (rows: its rows, default all but the last dim) runs here."""
    rows = x.reshape(-1, x.shape[-1]).shape[0] if rows is None else rows
    return _acts_ok(x) and rows <= MAX_ROWS[x.dtype]


def linear(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor | None:
    """x [..., K] @ weight [N, K].T (in out_dtype, default x's) on the kernels, or None where they do not take it."""
    if weight.device.type != "cpu" or weight.dim() != 2 or not dense_rows_ok(x):
        return None
    w = bf16_weight(weight)
    if w is None:
        return None
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    return cpu.linear_bf16(x2, w, out_dtype).view(*x.shape[:-1], w.shape[0])


def mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor | None:
    """down(silu(gate(x)) * up(x)) on the kernels (one call), or None where they do not take it."""
    if not dense_rows_ok(x):
        return None
    ws = [bf16_weight(w) for w in (gate, up, down)]
    if any(w is None for w in ws):
        return None
    x2 = x.reshape(-1, x.shape[-1]).contiguous()
    return cpu.mlp_bf16(x2, *ws).view_as(x)


def int4_ok(x: torch.Tensor, *weights: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether x @ each INT4 (packed [..., N, K/8], scale [..., N, K/G]) runs on the kernels."""
    if not _acts_ok(x):
        return False
    for packed, scale in weights:
        K = packed.shape[-1] * 8
        if (packed.device.type != "cpu" or scale.dtype != torch.bfloat16 or packed.dtype != torch.int32
                or scale.shape[-1] == 0 or not cpu.int4_supported(K, K // scale.shape[-1])
                or not packed.is_contiguous() or not scale.is_contiguous()):
            return False
    return True


def mla_heads(x: torch.Tensor, kv_b: torch.Tensor, n_heads: int, first_row: int, n_rows: int,
              transposed: bool) -> torch.Tensor | None:
    """Absorbed MLA's per-head products (cpu.heads_bf16) on x [B, S, H, *], or None where not taken."""
    if kv_b.device.type != "cpu" or not dense_rows_ok(x, rows=x.shape[0] * x.shape[1]):   # rows: tokens
        return None
    w = bf16_weight(kv_b)
    if w is None:
        return None
    x3 = x.reshape(-1, *x.shape[2:]).contiguous()
    return cpu.heads_bf16(x3, w, n_heads, first_row, n_rows, transposed).view(*x.shape[:2], n_heads, -1)


def attention_ok(q_latent: torch.Tensor, kv_cache: torch.Tensor, kv_scale: torch.Tensor | None) -> bool:
    """Whether absorbed MLA decode attention runs on the kernels (an fp8 cache does not)."""
    return (kv_scale is None and kv_cache.device.type == "cpu" and kv_cache.dtype in ACT_DTYPES
            and kv_cache.shape[1] <= cpu.MLA_MAX_BLOCK and kv_cache.is_contiguous() and _acts_ok(q_latent))


def rms_norm_ok(x: torch.Tensor, weight: torch.Tensor) -> bool:
    return (_acts_ok(x) and weight.device.type == "cpu" and weight.dtype in ACT_DTYPES
            and not (torch.is_grad_enabled() and weight.requires_grad))


def rope_ok(x: torch.Tensor) -> bool:
    return _acts_ok(x) and x.stride(-1) == 1 and x.shape[-1] % 2 == 0
