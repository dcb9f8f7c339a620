"""One function per hot op. The model calls these; each picks an implementation for its inputs.

Today every op runs its pure-torch reference from `kimi_engine.kernels`; the Triton kernels plug in
here, behind the same signatures, for CUDA tensors.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

from .int4 import dequantize
from .kernels.mla_decode import mla_decode_ref
from .kernels.moe import fused_moe_ref, moe_loop_ref
from .kernels.routing import route_ref
from .kernels.w4a16 import w4a16_matmul_ref


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (a bf16 / float weight)."""
    return F.linear(x, weight)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ INT4 weight (packed [N, K/8], scale [N, K/G]).T -> [..., N]."""
    return w4a16_matmul_ref(x.reshape(-1, x.shape[-1]), packed, scale).view(*x.shape[:-1], packed.shape[0])


def route(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int, topk_group: int,
          norm_topk_prob: bool, routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, K] float32, expert ids [T, K] int32); see route_ref."""
    return route_ref(logits, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)


def moe_int4(x, gate_up_packed, gate_up_scale, down_packed, down_scale, topk_weights, topk_ids):
    """Routed INT4 experts: x [T, D] -> [T, D]; see fused_moe_ref for the layout."""
    return fused_moe_ref(x, gate_up_packed, gate_up_scale, down_packed, down_scale, topk_weights, topk_ids)


def moe_dense(x, gate_up_weight, down_weight, topk_weights, topk_ids):
    """Routed bf16 experts: gate_up [E, 2I, D], down [E, D, I]; x [T, D] -> [T, D]."""
    return moe_loop_ref(x, lambda e: (gate_up_weight[e], down_weight[e]), topk_weights, topk_ids)


def mla_attention(q_latent, q_rope, kv_latent, k_rope, seq_lens, softmax_scale):
    """Absorbed MLA attention over the latent cache -> [B, S, H, C]; see mla_decode_ref."""
    return mla_decode_ref(q_latent, q_rope, kv_latent, k_rope, seq_lens, softmax_scale)


def dequantize_weight(packed: torch.Tensor, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    return dequantize(packed, scale, dtype)
