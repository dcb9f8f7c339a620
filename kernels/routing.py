"""The noaux_tc router: sigmoid scores, biased (optionally group-limited) top-k selection, unbiased weights."""

from __future__ import annotations

import torch


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
        weights = weights / (weights.sum(-1, keepdim=True) + 1e-20)
    return weights * routed_scaling_factor, ids.to(torch.int32)
