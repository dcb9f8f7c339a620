"""INT4 on the CPU through torch's int4 kernel (cpu_int4.py) against the references, and its dispatch."""

import pytest
import torch

from kimi_engine import cpu_int4, ops
from kimi_engine.int4 import quantize
from kimi_engine.kernels.moe import fused_moe_ref
from kimi_engine.kernels.w4a16 import w4a16_matmul_ref

pytestmark = pytest.mark.skipif(not cpu_int4.available(), reason="this torch has no CPU int4 kernel")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 5e-3}   # of the largest output: other summation orders (and bf16)


def close(out, ref, dtype):
    out, ref = out.float(), ref.float()
    torch.testing.assert_close(out, ref, rtol=TOL[dtype], atol=TOL[dtype] * ref.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M,N,K,G", [(1, 64, 96, 32), (7, 48, 256, 64), (33, 16, 128, 128)])
def test_linear_matches_reference(M, N, K, G, dtype):
    g = torch.Generator().manual_seed(M + N)
    packed, scale = quantize(torch.randn(N, K, generator=g) * K ** -0.5, G)
    x = torch.randn(M, K, generator=g).to(dtype)
    assert cpu_int4.supported(x, (packed, scale))
    close(cpu_int4.linear(x, packed, scale), w4a16_matmul_ref(x, packed, scale), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_moe_matches_reference(dtype):
    g = torch.Generator().manual_seed(0)
    E, D, I, T, K = 8, 64, 32, 11, 3
    gate_up = quantize(torch.randn(E, 2 * I, D, generator=g) * D ** -0.5)
    down = quantize(torch.randn(E, D, I, generator=g) * I ** -0.5)
    x = torch.randn(T, D, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E - 2, generator=g)[:K] for _ in range(T)]).int()   # two idle experts
    ids[0, 1] = -1                                                # another rank's expert: contributes nothing
    weights = torch.rand(T, K, generator=g)
    out = cpu_int4.moe(x, *gate_up, *down, weights, ids)
    close(out, fused_moe_ref(x, *gate_up, *down, weights, ids), dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_converted_weights_follow_in_place_updates(dtype):
    g = torch.Generator().manual_seed(1)
    packed, scale = quantize(torch.randn(32, 64, generator=g) / 8)
    x = torch.randn(1, 64, generator=g).to(dtype)                 # one row: the kernel in every dtype
    before = cpu_int4.linear(x, packed, scale)
    assert cpu_int4.converted(packed, scale, x.dtype) is cpu_int4.converted(packed, scale, x.dtype)   # cached
    new_packed, new_scale = quantize(torch.randn(32, 64, generator=g) / 8)
    packed.copy_(new_packed)                                      # as loading a checkpoint does
    after = cpu_int4.linear(x, packed, scale)
    assert not torch.allclose(before, after)
    close(after, w4a16_matmul_ref(x, packed, scale), dtype)
    scale.mul_(2)                                                 # the scales alone change too
    close(cpu_int4.linear(x, packed, scale), 2 * after, dtype)
    close(cpu_int4.linear(x, packed, new_scale), w4a16_matmul_ref(x, packed, new_scale), dtype)   # another scale


def test_inference_tensors_and_gradients():
    with torch.inference_mode():                                  # weights made under inference mode
        packed, scale = quantize(torch.randn(32, 64) / 8)
        x = torch.randn(1, 64)
        close(cpu_int4.linear(x, packed, scale), w4a16_matmul_ref(x, packed, scale), torch.float32)
    packed, scale = quantize(torch.randn(32, 64) / 8)
    x = torch.randn(1, 64, requires_grad=True)
    assert not cpu_int4.supported(x, (packed, scale))             # no backward in the kernel: the reference
    ops.int4_linear(x, packed, scale).sum().backward()
    assert x.grad is not None


def test_dispatch(monkeypatch):
    x = torch.randn(2, 64)
    fits, odd_rows = quantize(torch.randn(32, 64)), quantize(torch.randn(24, 64))
    odd_group = quantize(torch.randn(32, 64), 16)
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    assert ops.use_cpu_int4(x, fits)
    assert not ops.use_cpu_int4(x, odd_rows) and not ops.use_cpu_int4(x, odd_group)     # the reference takes these
    torch.testing.assert_close(ops.int4_linear(x, *odd_rows), w4a16_matmul_ref(x, *odd_rows))
    monkeypatch.setenv(ops.KERNELS_ENV, "torch")                  # the references, always
    assert not ops.use_cpu_int4(x, fits)
