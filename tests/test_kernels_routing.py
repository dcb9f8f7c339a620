"""route (Triton) against route_ref: the same experts in the same order, the same weights.

Scores are float32 in both; the weights differ only by the order of the K-term normalizing sum (a few
ulps), so they are compared at rtol 1e-6. Ids must be equal, ties included (lowest index wins).
"""

import pytest
import torch

from kimi_engine.kernels.routing import route, route_ref

# Kernels on CPU tensors: the interpreter (the `cuda` tests cover the compiled kernels on a GPU).
pytestmark = pytest.mark.interpreter


# (T, E, top_k, n_group, topk_group): K2's 384/8 flat router, DeepSeek-V3-style groups, odd E.
CASES = [
    (1, 8, 1, 1, 1),
    (1, 384, 8, 1, 1),       # Kimi K2 decode
    (33, 16, 8, 1, 1),
    (33, 64, 4, 8, 3),       # group-limited
    (7, 12, 3, 3, 2),        # E and groups off powers of two
    (5, 16, 2, 16, 4),       # one expert per group: a group's score is that expert's alone
    (4, 16, 6, 4, 1),        # more picks than the kept group holds: the rest by index, as stable sort
]


@pytest.mark.parametrize("T,E,top_k,n_group,topk_group", CASES)
@pytest.mark.parametrize("norm", [True, False])
def test_route_matches_reference(T, E, top_k, n_group, topk_group, norm):
    g = torch.Generator().manual_seed(T * E + top_k)
    logits, bias = torch.randn(T, E, generator=g), 0.1 * torch.randn(E, generator=g)
    weights, ids = route(logits, bias, top_k, n_group, topk_group, norm, 2.5)
    ref_weights, ref_ids = route_ref(logits, bias, top_k, n_group, topk_group, norm, 2.5)
    assert ids.dtype == torch.int32 and weights.dtype == torch.float32 and ids.shape == (T, top_k)
    torch.testing.assert_close(ids, ref_ids, rtol=0, atol=0)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-7)


def test_route_ties_go_to_lower_index():
    logits = torch.zeros(3, 16)
    logits[:, ::3] = 1.0                                  # experts 0, 3, 6, 9, 12, 15 tie on top
    logits[1] = 0.5                                       # every expert ties
    for n_group, topk_group in [(1, 1), (4, 2)]:
        weights, ids = route(logits, None, 6, n_group, topk_group)
        ref_weights, ref_ids = route_ref(logits, None, 6, n_group, topk_group)
        torch.testing.assert_close(ids, ref_ids, rtol=0, atol=0)
        torch.testing.assert_close(weights, ref_weights)
    assert route(logits, None, 4)[1][0].tolist() == [0, 3, 6, 9]


def test_route_strided_bf16_logits():
    logits = torch.randn(6, 64).bfloat16()[::2]          # bf16, non-contiguous rows
    bias = torch.randn(64).bfloat16()
    weights, ids = route(logits, bias.float(), 8, 1, 1, True, 1.0)
    ref_weights, ref_ids = route_ref(logits, bias.float(), 8, 1, 1, True, 1.0)
    torch.testing.assert_close(ids, ref_ids, rtol=0, atol=0)
    torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-7)


def test_route_rejects_bad_arguments():
    logits = torch.randn(2, 12)
    with pytest.raises(ValueError, match="top_k"):
        route(logits, None, 13)
    with pytest.raises(ValueError, match="n_group"):
        route(logits, None, 2, n_group=5, topk_group=1)
    with pytest.raises(ValueError, match="bias"):
        route(logits, torch.zeros(11), 2)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 8, 4096])
@pytest.mark.parametrize("n_group,topk_group", [(1, 1), (8, 4)])
def test_route_cuda(T, n_group, topk_group):
    E, top_k = 384, 8
    g = torch.Generator("cuda").manual_seed(T * 10 + n_group)
    logits = torch.randn(T, E, device="cuda", generator=g)
    bias = 0.1 * torch.randn(E, device="cuda", generator=g)
    weights, ids = route(logits, bias, top_k, n_group, topk_group, True, 2.827)
    ref_weights, ref_ids = route_ref(logits, bias, top_k, n_group, topk_group, True, 2.827)
    # The GPU's sigmoid may differ from torch's by an ulp, which can swap two experts (or, with groups,
    # two groups) whose biased scores tie within that ulp: allow a few such rows; where the same experts
    # are picked, their order must score the same.
    same_set = (ids.sort(1).values == ref_ids.sort(1).values).all(1)
    assert same_set.float().mean() > 0.99
    choice = logits.sigmoid() + bias
    torch.testing.assert_close(choice.gather(1, ids.long())[same_set], choice.gather(1, ref_ids.long())[same_set],
                               rtol=1e-6, atol=1e-6)
    same = (ids == ref_ids).all(1)
    assert same.float().mean() > 0.99
    torch.testing.assert_close(weights[same], ref_weights[same], rtol=1e-5, atol=1e-6)
