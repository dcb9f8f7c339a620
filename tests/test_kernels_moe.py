"""fused_moe (Triton) against fused_moe_ref, and moe_align's block layout.

Under the interpreter everything is float32 and the reference dequantizes exactly, so the results
differ only by summation order (~1e-6 relative). On CUDA at bf16, h and y are rounded to bf16 in both
(at different points), so they agree to a few bf16 ulps of the output's scale.
"""

import functools

import pytest
import torch

from kimi_engine.int4 import quantize
from kimi_engine.kernels.moe import fused_moe, fused_moe_ref, moe_align

# Kernels on CPU tensors: the interpreter (the `cuda` tests cover the compiled kernels on a GPU).
pytestmark = pytest.mark.interpreter


def make_experts(E, D, I, device="cpu", seed=0):
    """Random INT4 experts, built and quantized on `device` (Kimi widths are billions of values)."""
    g = torch.Generator(device).manual_seed(seed)
    gate_up = torch.randn(E, 2 * I, D, generator=g, device=device) * D ** -0.5
    down = torch.randn(E, D, I, generator=g, device=device) * I ** -0.5
    return [*quantize(gate_up), *quantize(down)]


@functools.lru_cache(maxsize=1)
def kimi_width_experts():
    # Kimi K2 widths (hidden 7168, expert intermediate 2048) with 64 experts to keep memory small.
    return make_experts(64, 7168, 2048, device="cuda")


def make_routing(T, top_k, used_experts, seed=0, device="cpu"):
    """Distinct ids per token drawn from the first `used_experts` (the rest get no tokens)."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.stack([torch.randperm(used_experts, generator=g)[:top_k] for _ in range(T)]).int()
    return torch.rand(T, top_k, generator=g).to(device), ids.to(device)


# (T, E, top_k, D, I, used experts). D=96 and I=32/96 sit off the interpreter tiles (64), so both
# GEMMs have N and K tails. T*K <= E runs the decode (BLOCK_M=1) body, larger T the sorted tl.dot one.
CASES = [
    (1, 8, 1, 96, 32, 8),       # decode, top-1
    (1, 16, 8, 96, 32, 16),     # decode, top-8: 8 experts touched of 16
    (2, 16, 8, 64, 96, 16),     # two tokens, experts shared between them
    (9, 16, 2, 64, 64, 4),      # blocks, 12 zero-token experts
    (33, 8, 2, 96, 32, 8),      # M=33
    (33, 16, 8, 96, 32, 9),     # top-8, 7 zero-token experts, padding in most blocks
    (7, 16, 3, 64, 96, 5),
]


@pytest.mark.parametrize("T,E,top_k,D,I,used", CASES)
def test_fused_moe_matches_reference(T, E, top_k, D, I, used):
    experts = make_experts(E, D, I)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(1))
    weights, ids = make_routing(T, top_k, used)
    out = fused_moe(x, *experts, weights, ids)
    assert out.shape == (T, D) and out.dtype == x.dtype
    torch.testing.assert_close(out, fused_moe_ref(x, *experts, weights, ids), rtol=1e-5, atol=1e-5)


def test_fused_moe_int64_ids_and_bf16():
    experts = make_experts(8, 64, 32)
    x = torch.randn(5, 64)
    weights, ids = make_routing(5, 3, 8)
    torch.testing.assert_close(fused_moe(x, *experts, weights, ids.long()), fused_moe_ref(x, *experts, weights, ids),
                               rtol=1e-5, atol=1e-5)
    out = fused_moe(x.bfloat16(), *experts, weights, ids)
    ref = fused_moe_ref(x.bfloat16(), *experts, weights, ids)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("block_m", [1, 4, 16])
def test_moe_align_blocks(block_m):
    E, top_k = 8, 3
    _, ids = make_routing(6, top_k, 5)                    # experts 5..7 get no tokens
    sorted_ids, block_expert = moe_align(ids, E, block_m)
    pairs = ids.numel()
    assert sorted_ids.numel() == block_expert.numel() * block_m
    real = sorted_ids[sorted_ids < pairs]
    assert sorted(real.tolist()) == list(range(pairs))    # every pair exactly once
    blocks = sorted_ids.view(-1, block_m)
    flat = ids.flatten()
    for b, e in enumerate(block_expert.tolist()):
        rows = blocks[b][blocks[b] < pairs]
        if e < 0:                                         # unused blocks come last and are empty
            assert rows.numel() == 0 and (block_expert[b:] < 0).all()
        else:
            assert rows.numel() > 0 and (flat[rows.long()] == e).all()
    assert not set(block_expert.tolist()) & {5, 6, 7}


@pytest.mark.parametrize("T,top_k", [(1, 8), (33, 3)])
def test_fused_moe_expert_parallel_skips_minus_one(T, top_k):
    """Expert parallel: each half of the experts, given local ids with -1 for the other half's,
    yields a partial sum; the two partials add up to all experts' result (decode and block paths)."""
    E, D, I = 16, 64, 32
    experts = make_experts(E, D, I)
    x = torch.randn(T, D, generator=torch.Generator().manual_seed(2))
    weights, ids = make_routing(T, top_k, E)
    parts = []
    for e0 in (0, E // 2):
        local = ids - e0
        local = local.masked_fill((local < 0) | (local >= E // 2), -1)
        half = [t[e0:e0 + E // 2] for t in experts]
        out = fused_moe(x, *half, weights, local)
        torch.testing.assert_close(out, fused_moe_ref(x, *half, weights, local), rtol=1e-5, atol=1e-5)
        parts.append(out)
    torch.testing.assert_close(parts[0] + parts[1], fused_moe_ref(x, *experts, weights, ids), rtol=1e-5, atol=1e-5)
    _, block_expert = moe_align(ids.masked_fill(ids >= E // 2, -1), E // 2, 4)
    assert block_expert.max() < E // 2


def test_fused_moe_rejects_bad_inputs():
    experts = make_experts(4, 64, 32)
    weights, ids = make_routing(2, 2, 4)
    with pytest.raises(ValueError, match="down_packed"):
        fused_moe(torch.randn(2, 64), experts[0], experts[1], experts[0], experts[3], weights, ids)
    with pytest.raises(ValueError, match="topk_ids"):
        fused_moe(torch.randn(2, 64), *experts, weights, ids[:1])
    with pytest.raises(ValueError, match="gate_up_packed"):
        fused_moe(torch.randn(2, 72), *experts, weights, ids)


@pytest.mark.cuda
@pytest.mark.parametrize("T", [1, 8, 64, 512])
@pytest.mark.parametrize("top_k", [1, 8])
def test_fused_moe_cuda_bf16(T, top_k):
    experts = kimi_width_experts()
    E, D = experts[0].shape[0], experts[2].shape[1]
    x = torch.randn(T, D, device="cuda").bfloat16()
    weights, ids = make_routing(T, top_k, E - 8, device="cuda")   # 8 experts without tokens
    out = fused_moe(x, *experts, weights, ids)
    ref = fused_moe_ref(x, *experts, weights, ids)
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2 * ref.float().abs().max().item())
