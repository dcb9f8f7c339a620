"""Mixture of experts over stacked expert weights: SiLU(x W_gate^T) * (x W_up^T) W_down^T, weighted and summed."""

from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F

from ..int4 import dequantize


def moe_loop_ref(
    x: torch.Tensor,
    expert_weights: Callable[[int], tuple[torch.Tensor, torch.Tensor]],
    topk_weights: torch.Tensor,
    topk_ids: torch.Tensor,
) -> torch.Tensor:
    """x [T, D], routing weights/ids [T, K] -> [T, D] in x.dtype.

    `expert_weights(e)` gives (gate_up [2I, D], down [D, I]) in x.dtype. Vectorized over tokens: one
    pass per expert that received tokens; the weighted sum accumulates in float32.
    """
    out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
    for e in topk_ids.unique().tolist():
        token, slot = torch.nonzero(topk_ids == e, as_tuple=True)
        gate_up, down = expert_weights(e)
        gate, up = F.linear(x[token], gate_up).chunk(2, dim=-1)
        y = F.linear(F.silu(gate) * up, down)                            # [n, D]
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
