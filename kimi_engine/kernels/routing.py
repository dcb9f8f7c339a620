"""The noaux_tc router: sigmoid scores, biased (optionally group-limited) top-k selection, unbiased weights."""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from .w4a16 import is_interpreted

NORM_EPS = 1e-20     # keeps the normalization finite when every chosen score underflows to 0
_NORM_EPS = tl.constexpr(NORM_EPS)


def route_ref(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, K] float32, ids [T, K] int32).

    s = sigmoid(logits); experts are chosen on s + bias (only in the selected groups when n_group > 1;
    a group's score is the sum of its two best biased scores); the weights are the unbiased s of the
    chosen experts, divided by their sum when norm_topk_prob, times routed_scaling_factor.
    Ties go to the lower expert (or group) index: selection uses a stable descending sort. The ids
    come out in order of decreasing biased score.
    """
    T, E = logits.shape
    scores = logits.float().sigmoid()                                    # [T, E]
    choice = scores if bias is None else scores + bias.float()
    if n_group > 1:
        grouped = choice.view(T, n_group, E // n_group)                  # [T, G, E/G]
        group_scores = grouped.topk(min(2, E // n_group), dim=-1).values.sum(-1)  # [T, G]
        keep = torch.sort(group_scores, dim=-1, descending=True, stable=True).indices[:, :topk_group]
        group_mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)
        choice = choice.masked_fill(~group_mask.repeat_interleave(E // n_group, dim=1), float("-inf"))
    ids = torch.sort(choice, dim=-1, descending=True, stable=True).indices[:, :top_k]  # [T, K]
    weights = scores.gather(1, ids)
    if norm_topk_prob:
        weights = weights / (weights.sum(-1, keepdim=True) + NORM_EPS)
    return weights * routed_scaling_factor, ids.to(torch.int32)


# ------------------------------------------------------------------------------------------ kernel
@triton.jit
def _take_best(values, taken, offs, BLOCK: tl.constexpr):
    """Index of the largest value not yet taken; ties (and an all -inf remainder) go to the lowest
    index, which is what a stable descending sort picks next."""
    best = tl.max(tl.where(taken, float("-inf"), values), axis=0)
    return tl.min(tl.where((values == best) & ~taken, offs, BLOCK), axis=0)


@triton.jit
def route_kernel(
    # pointers
    logits_ptr, bias_ptr, weights_ptr, ids_ptr,
    # sizes
    E, scaling,
    # strides
    stride_lt, stride_le, stride_wt, stride_wk, stride_it, stride_ik,
    # constexprs
    TOP_K: tl.constexpr, N_GROUP: tl.constexpr, TOPK_GROUP: tl.constexpr, GROUP_E: tl.constexpr,
    NORM_TOPK_PROB: tl.constexpr, BLOCK_E: tl.constexpr, BLOCK_G: tl.constexpr, BLOCK_K: tl.constexpr,
):
    """One program per token: the whole router in registers (E <= a few thousand)."""
    t = tl.program_id(0).to(tl.int64)
    offs_e = tl.arange(0, BLOCK_E)
    valid = offs_e < E
    logits = tl.load(logits_ptr + t * stride_lt + offs_e * stride_le, mask=valid, other=0).to(tl.float32)
    scores = tl.sigmoid(logits)
    choice = scores + tl.load(bias_ptr + offs_e, mask=valid, other=0).to(tl.float32)

    if N_GROUP > 1:
        # member[g, e]: expert e lies in group g (groups are consecutive runs of GROUP_E experts)
        offs_g = tl.arange(0, BLOCK_G)
        member = ((offs_e // GROUP_E)[None, :] == offs_g[:, None]) & valid[None, :]   # [BLOCK_G, BLOCK_E]
        grouped = tl.where(member, choice[None, :], float("-inf"))
        best = tl.max(grouped, axis=1)                                                # [BLOCK_G]
        if GROUP_E > 1:  # a group's score: its two best biased scores (duplicates count twice, as topk)
            first = tl.min(tl.where(grouped == best[:, None], offs_e[None, :], BLOCK_E), axis=1)
            best += tl.max(tl.where(offs_e[None, :] == first[:, None], float("-inf"), grouped), axis=1)
        padding = offs_g >= N_GROUP                               # never chosen
        chosen = offs_g < 0
        for _ in tl.static_range(TOPK_GROUP):
            g = _take_best(best, padding | chosen, offs_g, BLOCK_G)
            chosen = chosen | (offs_g == g)
        in_chosen = tl.max(tl.where(member & chosen[:, None], 1, 0), axis=0) > 0     # [BLOCK_E]
        choice = tl.where(in_chosen, choice, float("-inf"))

    offs_k = tl.arange(0, BLOCK_K)
    weights = tl.zeros((BLOCK_K,), dtype=tl.float32)
    ids = tl.zeros((BLOCK_K,), dtype=tl.int32)
    taken = ~valid                                                # padding experts are never chosen
    for k in tl.static_range(TOP_K):
        e = _take_best(choice, taken, offs_e, BLOCK_E)
        taken = taken | (offs_e == e)
        weights = tl.where(offs_k == k, tl.sum(tl.where(offs_e == e, scores, 0.0), axis=0), weights)
        ids = tl.where(offs_k == k, e, ids)
    if NORM_TOPK_PROB:
        weights = weights / (tl.sum(weights, axis=0) + _NORM_EPS)
    weights = weights * scaling
    out_mask = offs_k < TOP_K
    tl.store(weights_ptr + t * stride_wt + offs_k * stride_wk, weights, mask=out_mask)
    tl.store(ids_ptr + t * stride_it + offs_k * stride_ik, ids, mask=out_mask)


# ------------------------------------------------------------------------------------------ wrapper
def route(
    logits: torch.Tensor,
    bias: torch.Tensor | None,
    top_k: int,
    n_group: int = 1,
    topk_group: int = 1,
    norm_topk_prob: bool = True,
    routed_scaling_factor: float = 1.0,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] (any float dtype) -> (weights [T, K] float32, ids [T, K] int32), as route_ref.

    Same choices as route_ref, ties included: each of the K picks takes the largest remaining biased
    score and, among equal scores, the lowest expert index (groups likewise), so the ids come out in
    the stable-descending-sort order. Scores are float32 throughout.
    """
    if logits.dim() != 2 or not logits.dtype.is_floating_point:
        raise TypeError(f"logits must be a 2-D float tensor [T, E], got {logits.dtype} {tuple(logits.shape)}")
    T, E = logits.shape
    if not 1 <= top_k <= E:
        raise ValueError(f"top_k must lie in [1, {E}] (the number of experts), got {top_k}")
    if n_group < 1 or E % n_group or not 1 <= topk_group <= n_group:
        raise ValueError(f"n_group {n_group} must divide E={E} and topk_group {topk_group} lie in [1, n_group]")
    if bias is None:
        bias = torch.zeros(E, dtype=torch.float32, device=logits.device)
    if bias.shape != (E,) or not bias.is_contiguous():
        raise ValueError(f"bias must be a contiguous [E={E}] tensor, got {tuple(bias.shape)}")
    weights = torch.empty(T, top_k, dtype=torch.float32, device=logits.device)
    ids = torch.empty(T, top_k, dtype=torch.int32, device=logits.device)
    if T == 0:
        return weights, ids

    grid = lambda meta: (T,)
    route_kernel[grid](
        logits, bias, weights, ids,
        E, float(routed_scaling_factor),
        logits.stride(0), logits.stride(1), weights.stride(0), weights.stride(1), ids.stride(0), ids.stride(1),
        TOP_K=top_k, N_GROUP=n_group, TOPK_GROUP=topk_group, GROUP_E=E // n_group,
        NORM_TOPK_PROB=bool(norm_topk_prob), BLOCK_E=triton.next_power_of_2(E),
        BLOCK_G=triton.next_power_of_2(n_group), BLOCK_K=triton.next_power_of_2(top_k),
        num_warps=1 if is_interpreted(route_kernel) else 4,
    )
    return weights, ids
