"""The tiny model through the Triton kernels (KIMI_ENGINE_KERNELS=triton, interpreter on CPU) against the
reference path, and the dispatch rules of ops.

float32 model: the kernels differ from the references only by summation order, so logits agree far
inside the 1e-3 relative bound the issue asks for.
"""

import pytest
import torch

import kimi_engine
from kimi_engine import ops
from kimi_engine.synthetic import tiny_config, write_random_checkpoint

# Kernels on CPU tensors: the interpreter (the `cuda` tests cover the compiled kernels on a GPU).
pytestmark = pytest.mark.interpreter


@pytest.fixture(scope="module", params=[{}, dict(n_group=4, topk_group=2, num_experts_per_tok=3)],
                ids=["flat-router", "group-limited"])
def engine(request, tmp_path_factory):
    path = write_random_checkpoint(tmp_path_factory.mktemp("tiny"), tiny_config(**request.param))
    return kimi_engine.load(path, dtype=torch.float32, progress=False, device="cpu")


@pytest.fixture
def calls(monkeypatch):
    """Count the kernel wrappers that ops dispatches to."""
    counts = {"route": 0, "fused_moe": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            counts[name] += 1
            return fn(*args, **kwargs)
        return wrapped
    monkeypatch.setattr(ops, "route_kernel", counting("route", ops.route_kernel))
    monkeypatch.setattr(ops, "fused_moe", counting("fused_moe", ops.fused_moe))
    return counts


def test_triton_path_matches_reference_logits(engine, monkeypatch, calls):
    ids = [3, 17, 42, 7, 99, 5, 250, 11, 64]                 # 9 tokens: sorted-block (tl.dot) MoE path
    monkeypatch.setenv(ops.KERNELS_ENV, "torch")
    ref, ref_one = engine.logits(ids), engine.logits(ids[:1])
    assert calls == {"route": 0, "fused_moe": 0}
    monkeypatch.setenv(ops.KERNELS_ENV, "triton")
    out, out_one = engine.logits(ids), engine.logits(ids[:1])  # 1 token: the decode (GEMV) MoE path
    moe_layers = engine.config.num_hidden_layers - engine.config.first_k_dense_replace
    assert calls == {"route": 2 * moe_layers, "fused_moe": 2 * moe_layers}
    for a, b in [(out, ref), (out_one, ref_one)]:
        assert ((a - b).norm() / b.norm()).item() < 1e-3
        torch.testing.assert_close(a, b, rtol=1e-3, atol=1e-3 * b.abs().max().item())


def test_triton_path_greedy_decode(engine, monkeypatch):
    # Absorbed single-token decode steps run the T=1 kernels; the continuation must not change.
    monkeypatch.setenv(ops.KERNELS_ENV, "torch")
    ref = engine.greedy([1, 2, 3, 4], max_new_tokens=3)
    monkeypatch.setenv(ops.KERNELS_ENV, "triton")
    assert engine.greedy([1, 2, 3, 4], max_new_tokens=3) == ref


def test_kernel_mode_env(monkeypatch):
    x = torch.zeros(2)
    monkeypatch.delenv(ops.KERNELS_ENV, raising=False)
    assert ops.kernel_mode() == "auto" and not ops.use_triton(x)   # auto: references for CPU tensors
    monkeypatch.setenv(ops.KERNELS_ENV, " Triton ")
    assert ops.kernel_mode() == "triton" and ops.use_triton(x)
    monkeypatch.setenv(ops.KERNELS_ENV, "torch")
    assert not ops.use_triton(x)
    monkeypatch.setenv(ops.KERNELS_ENV, "cuda")
    with pytest.raises(ValueError, match=ops.KERNELS_ENV):
        ops.kernel_mode()


def test_int4_linear_dispatch(monkeypatch):
    from kimi_engine.int4 import quantize
    packed, scale = quantize(torch.randn(24, 64))
    x = torch.randn(2, 3, 64)
    monkeypatch.setenv(ops.KERNELS_ENV, "torch")
    ref = ops.int4_linear(x, packed, scale)
    monkeypatch.setenv(ops.KERNELS_ENV, "triton")
    out = ops.int4_linear(x, packed, scale)
    assert out.shape == (2, 3, 24)
    torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-4)


@pytest.mark.parametrize("kernels", ["auto", "torch"])
def test_router_logits_on_cpu_is_the_float32_matmul(kernels, monkeypatch):
    # The CPU kernels sum the same exact float32 products as torch's float32 linear, in another order.
    monkeypatch.setenv("KIMI_ENGINE_KERNELS", kernels)
    x, w = torch.randn(3, 640, dtype=torch.bfloat16), torch.randn(16, 640, dtype=torch.bfloat16)
    logits = ops.router_logits(x, w)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, torch.nn.functional.linear(x.float(), w.float()), rtol=1e-6, atol=1e-4)


@pytest.mark.cuda
def test_router_logits_bf16_gemm_equals_float32_matmul():
    # Kimi widths: the float32-output GEMM on bf16 operands sums the same exact products as HF's float32
    # linear, but tensor cores accumulate blocks of products with truncation (not IEEE rounding): an
    # emulation at K=7168 gives up to ~4e-5 on logits of size ~1, hence 2e-4.
    x = torch.randn(5, 7168, device="cuda", dtype=torch.bfloat16)
    w = torch.randn(384, 7168, device="cuda", dtype=torch.bfloat16) / 7168 ** 0.5
    logits = ops.router_logits(x, w)
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits, torch.nn.functional.linear(x.float(), w.float()), rtol=1e-4, atol=2e-4)
