"""The CPU kernels (kernels/cpu.py, cpu_kernels.cpp) against their references, the model on them against the
reference path, the fallback where they cannot build, and the threading policy.

Tolerances: float32 activations: the kernels compute in float32 with another summation order, so 1e-5 of
the largest output (a few float32 ulps of the sums). bf16 activations: the output is rounded to bf16 once
(2^-8 relative) where the reference also rounds its dequantized weights and intermediate products, so
2e-2 of the largest output.
"""

import pytest
import torch
import torch.nn.functional as F

import kimi_engine
from kimi_engine import ops
from kimi_engine.int4 import dequantize, quantize
from kimi_engine.kernels import cpu
from kimi_engine.kernels.mla_decode import mla_decode_ref
from kimi_engine.kernels.moe import fused_moe_ref
from kimi_engine.kernels.routing import route_ref
from kimi_engine.synthetic import tiny_config, write_random_checkpoint


pytestmark = pytest.mark.skipif(not cpu.available(), reason=f"CPU kernels unavailable: {cpu.unavailable_reason()}")
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2}
DTYPES = [torch.float32, torch.bfloat16]


def close(out, ref, dtype):
    assert out.dtype == dtype
    out, ref = out.float(), ref.float()
    torch.testing.assert_close(out, ref, rtol=TOL[dtype], atol=TOL[dtype] * ref.abs().max().item())


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K", [(1, 48, 40), (3, 33, 64), (5, 7, 200), (9, 130, 96), (1, 257, 1056)])
def test_linear_bf16(M, N, K, dtype):
    g = torch.Generator().manual_seed(M * N + K)
    w = (torch.randn(N, K, generator=g) * K ** -0.5).bfloat16()
    x = torch.randn(M, K, generator=g).to(dtype)
    close(cpu.linear_bf16(x, w), F.linear(x.float(), w.float()), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,N,K,G", [(1, 48, 64, 32), (3, 33, 96, 32), (5, 7, 256, 64), (6, 17, 384, 128),
                                     (2, 8, 512, 256), (4, 5, 160, 32)])
def test_linear_int4(M, N, K, G, dtype):
    g = torch.Generator().manual_seed(M * N + K)
    packed, scale = quantize(torch.randn(N, K, generator=g) * K ** -0.5, G)
    x = torch.randn(M, K, generator=g).to(dtype)
    close(cpu.linear_int4(x, packed, scale), F.linear(x.float(), dequantize(packed, scale)), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,D,I", [(1, 64, 40), (6, 96, 72)])
def test_mlp_bf16(M, D, I, dtype):
    g = torch.Generator().manual_seed(M + D)
    gate, up = [(torch.randn(I, D, generator=g) * D ** -0.5).bfloat16() for _ in range(2)]
    down = (torch.randn(D, I, generator=g) * I ** -0.5).bfloat16()
    x = torch.randn(M, D, generator=g).to(dtype)
    ref = F.linear(F.silu(F.linear(x.float(), gate.float())) * F.linear(x.float(), up.float()), down.float())
    close(cpu.mlp_bf16(x, gate, up, down), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("M,H,N,V,C", [(1, 3, 16, 8, 40), (2, 4, 24, 16, 160), (3, 2, 19, 8, 72)])
def test_absorbed_mla_heads(M, H, N, V, C, dtype):
    g = torch.Generator().manual_seed(M * H + C)
    kv_b = (torch.randn(H * (N + V), C, generator=g) * C ** -0.5).bfloat16()
    w = kv_b.float().view(H, N + V, C)
    q_nope = torch.randn(M, H, N, generator=g).to(dtype)
    latent = torch.randn(M, H, C, generator=g).to(dtype)
    close(cpu.heads_bf16(q_nope, kv_b, H, 0, N, transposed=True),
          torch.einsum("mhn,hnc->mhc", q_nope.float(), w[:, :N]), dtype)
    close(cpu.heads_bf16(latent, kv_b, H, N, V, transposed=False),
          torch.einsum("mhc,hvc->mhv", latent.float(), w[:, N:]), dtype)
    with pytest.raises(ValueError, match=f"n_heads={H}"):   # rows past a head's block
        cpu.heads_bf16(latent, kv_b, H, N, V + 1, transposed=False)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("T,K", [(1, 3), (11, 3), (40, 2)])
def test_moe_int4(T, K, dtype):
    g = torch.Generator().manual_seed(T)
    E, D, I = 8, 96, 64
    gate_up = quantize(torch.randn(E, 2 * I, D, generator=g) * D ** -0.5)
    down = quantize(torch.randn(E, D, I, generator=g) * I ** -0.5)
    x = torch.randn(T, D, generator=g).to(dtype)
    ids = torch.stack([torch.randperm(E - 2, generator=g)[:K] for _ in range(T)]).int()   # two idle experts
    ids[0, 1] = -1                                      # another rank's expert: contributes nothing
    weights = torch.rand(T, K, generator=g)
    ref = fused_moe_ref(x.float(), *gate_up, *down, weights, ids)
    close(cpu.moe_int4(x, *gate_up, *down, weights, ids), ref, dtype)


@pytest.mark.parametrize("G", [32, 64])
def test_moe_int4_strips(G):
    """Experts with many tokens (30 each here) and widths in whole 128-column blocks take the strip
    path in bf16 (Strip in cpu_kernels.cpp): equal to the reference and to the float32 tile."""
    g = torch.Generator().manual_seed(G)
    E, D, I, T, K = 4, 256, 128, 40, 3
    gate_up = quantize(torch.randn(E, 2 * I, D, generator=g) * D ** -0.5, group_size=G)
    down = quantize(torch.randn(E, D, I, generator=g) * I ** -0.5, group_size=G)
    x = torch.randn(T, D, generator=g).bfloat16()
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(T)]).int()
    weights = torch.rand(T, K, generator=g)
    out = cpu.moe_int4(x, *gate_up, *down, weights, ids)
    close(out, fused_moe_ref(x.float(), *gate_up, *down, weights, ids), torch.bfloat16)
    close(out, cpu.moe_int4(x.float(), *gate_up, *down, weights, ids).bfloat16(), torch.bfloat16)


def paged_cache(lens, H, C, R, block_size, dtype, g):
    """Queries and a paged cache whose blocks are shuffled (and one block left unused)."""
    blocks = [-(-n // block_size) for n in lens]
    order = torch.randperm(sum(blocks) + 1, generator=g).int()
    table = torch.zeros(len(lens), max(blocks), dtype=torch.int32)
    for i, b in enumerate(blocks):
        table[i, :b] = order[sum(blocks[:i]):sum(blocks[:i]) + b]
    kv = torch.randn(len(order), block_size, C + R, generator=g).to(dtype)
    q_latent, q_rope = (torch.randn(len(lens), H, d, generator=g).to(dtype) for d in (C, R))
    return q_latent, q_rope, kv, table, torch.tensor(lens, dtype=torch.int32)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("lens,H,C,R,block_size", [
    ([1, 7, 200], 3, 32, 16, 16),       # a single token; a part block; heads under one vector
    ([700], 17, 40, 8, 64),             # split over tasks; 17 heads (two vectors); C not a multiple of 16
    ([129, 64, 65, 5], 4, 64, 8, 32),   # exactly-full blocks; one past
    ([300, 9], 70, 48, 16, 64),         # 70 heads: five head vectors; odd token counts in a block
    ([50], 3, 33, 8, 16),               # C + R odd: bf16 takes the float path
])
def test_mla_decode(lens, H, C, R, block_size, dtype):
    g = torch.Generator().manual_seed(sum(lens) + H)
    args = paged_cache(lens, H, C, R, block_size, dtype, g)
    close(cpu.mla_decode(*args, 0.3), mla_decode_ref(*args, 0.3), dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rms_norm(dtype):
    g = torch.Generator().manual_seed(5)
    x = torch.randn(3, 20, 200, generator=g).to(dtype)
    w = (1 + torch.randn(150, generator=g) / 4).to(dtype)
    cols = x[..., 30:180]   # strided rows, as the latent split of kv_a's output
    x32 = cols.float()
    ref = w * (x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + 1e-6)).to(dtype)
    close(cpu.rms_norm(cols, w, 1e-6), ref, dtype)


@pytest.mark.parametrize("dtype", DTYPES)
def test_rope_bits_equal_the_reference(dtype, monkeypatch):
    g = torch.Generator().manual_seed(6)
    q = torch.randn(2, 3, 5, 24, generator=g).to(dtype)[..., 8:]   # [B, S, H, R=16], strided rows
    k = torch.randn(2, 3, 40, generator=g).to(dtype)[..., 24:]      # [B, S, R]
    cos, sin = torch.randn(2, 3, 8, generator=g), torch.randn(2, 3, 8, generator=g)
    fast = [ops.rope(t, cos, sin) for t in (q, k)]
    monkeypatch.setenv("KIMI_ENGINE_KERNELS", "torch")
    for out, t in zip(fast, (q, k)):
        assert torch.equal(out, ops.rope(t, cos, sin))


@pytest.mark.parametrize("E,K,n_group,topk_group,norm", [(64, 8, 1, 1, True), (384, 8, 1, 1, True),
                                                        (16, 2, 4, 2, False), (12, 3, 12, 4, True)])
def test_route_chooses_as_the_reference(E, K, n_group, topk_group, norm):
    g = torch.Generator().manual_seed(E + K)
    logits = torch.randn(37, E, generator=g)
    logits[0, :] = 0.5                       # all tied: the lowest ids, as the stable sort picks
    logits[1, E // 2:] = logits[1, :E // 2]  # pairwise ties across halves (and groups)
    bias = torch.randn(E, generator=g) / 10
    for b in (bias, None):
        weights, ids = cpu.route(logits, b, K, n_group, topk_group, norm, 2.5)
        ref_weights, ref_ids = route_ref(logits, b, K, n_group, topk_group, norm, 2.5)
        assert torch.equal(ids, ref_ids)
        torch.testing.assert_close(weights, ref_weights, rtol=1e-6, atol=1e-7)


def test_wrappers_name_bad_arguments():
    w = torch.randn(8, 32).bfloat16()
    with pytest.raises(ValueError, match=r"expected \[M, 32\]"):
        cpu.linear_bf16(torch.randn(2, 16), w)
    with pytest.raises(ValueError, match="weight"):
        cpu.linear_bf16(torch.randn(2, 32), w.float())
    with pytest.raises(ValueError, match="float32/bfloat16"):
        cpu.linear_bf16(torch.randn(2, 32).half(), w)
    packed, scale = quantize(torch.randn(8, 48), 16)
    with pytest.raises(ValueError, match="group size 16"):
        cpu.linear_int4(torch.randn(1, 48), packed, scale)
    with pytest.raises(ValueError, match="threads=0"):
        cpu.set_threads(0)
    q_latent, q_rope, kv, table, lens = paged_cache([5], 2, 16, 8, 16, torch.float32, torch.Generator())
    with pytest.raises(ValueError, match="kv_cache"):
        cpu.mla_decode(q_latent, q_rope, kv[..., :20].contiguous(), table, lens, 1.0)
    with pytest.raises(ValueError, match="block_size 512"):
        cpu.mla_decode(q_latent, q_rope, torch.zeros(2, 512, 24), table, lens, 1.0)
    with pytest.raises(ValueError, match="top_k=9"):
        cpu.route(torch.randn(2, 8), None, 9, 1, 1, True, 1.0)
    with pytest.raises(ValueError, match="rms_norm"):
        cpu.rms_norm(torch.randn(2, 8), torch.ones(4), 1e-6)


def test_thread_counts_agree():
    g = torch.Generator().manual_seed(3)
    packed, scale = quantize(torch.randn(300, 256, generator=g))
    x = torch.randn(3, 256, generator=g)
    # Experts large enough for two gate-up tasks each: a down task waits for both of its expert's.
    E, D, I = 4, 1024, 512
    gate_up = quantize(torch.randn(E, 2 * I, D, generator=g) * D ** -0.5)
    down = quantize(torch.randn(E, D, I, generator=g) * I ** -0.5)
    xm = torch.randn(3, D, generator=g)
    ids, weights = torch.tensor([[0, 1], [2, 0], [3, 1]], dtype=torch.int32), torch.rand(3, 2, generator=g)
    before = cpu.get_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            cpu.set_threads(n)
            assert cpu.get_threads() == n
            outs.append((cpu.linear_int4(x, packed, scale), cpu.moe_int4(xm, *gate_up, *down, weights, ids)))
    finally:
        cpu.set_threads(before)
    for out in outs[1:]:   # each output is one task's sum, whichever thread ran it: identical
        assert all(torch.equal(a, b) for a, b in zip(out, outs[0]))
    close(outs[0][1], fused_moe_ref(xm, *gate_up, *down, weights, ids), torch.float32)


# ------------------------------------------------------------------------------------------ the model
# Odd sizes: hidden 96 (not a multiple of the kernels' 128-column INT4 block), dense intermediate 72,
# 3 heads, vocab 301, experts of 64.
ODD = dict(hidden_size=96, intermediate_size=72, moe_intermediate_size=64, vocab_size=301, num_attention_heads=3)


@pytest.fixture(scope="module")
def odd_checkpoint(tmp_path_factory):
    return write_random_checkpoint(tmp_path_factory.mktemp("odd"), tiny_config(**ODD), seed=2)


@pytest.mark.parametrize("dtype", DTYPES)
def test_model_on_kernels_matches_reference(odd_checkpoint, dtype, monkeypatch):
    engine = kimi_engine.load(odd_checkpoint, dtype=dtype, device="cpu", progress=False)
    ids = [3, 17, 42, 7, 99, 5, 250, 11, 64]
    calls = {"moe": 0, "linear": 0}

    def counting(name, fn):
        def wrapped(*args, **kwargs):
            calls[name] += 1
            return fn(*args, **kwargs)
        return wrapped
    monkeypatch.setenv(ops.KERNELS_ENV, "torch")
    ref, ref_one, ref_tokens = engine.logits(ids), engine.logits(ids[:1]), engine.greedy([1, 2, 3, 4], 8)
    monkeypatch.setenv(ops.KERNELS_ENV, "auto")
    monkeypatch.setattr(cpu, "moe_int4", counting("moe", cpu.moe_int4))
    monkeypatch.setattr(cpu, "linear_bf16", counting("linear", cpu.linear_bf16))
    out, out_one, tokens = engine.logits(ids), engine.logits(ids[:1]), engine.greedy([1, 2, 3, 4], 8)
    assert calls["moe"] > 0 and calls["linear"] > 0          # the kernels did run
    bound = 1e-4 if dtype == torch.float32 else 3e-2          # relative to the logits' norm
    for a, b in [(out, ref), (out_one, ref_one)]:
        assert ((a - b).norm() / b.norm()).item() < bound
    assert tokens == ref_tokens


def test_fallback_when_the_build_fails(odd_checkpoint, monkeypatch, tmp_path):
    monkeypatch.setenv("CXX", str(tmp_path / "no-such-compiler"))
    monkeypatch.setenv("KIMI_ENGINE_CACHE", str(tmp_path / "cache"))   # nothing built there yet
    cpu.reset()
    try:
        with pytest.warns(RuntimeWarning, match="no-such-compiler"):
            assert not cpu.available()
        assert "no-such-compiler" in cpu.unavailable_reason()
        engine = kimi_engine.load(odd_checkpoint, dtype=torch.float32, device="cpu", progress=False)
        ids = [3, 17, 42, 7]
        out, tokens = engine.logits(ids), engine.greedy([1, 2, 3, 4], 4)   # torch's paths
        monkeypatch.setenv(ops.KERNELS_ENV, "torch")
        torch.testing.assert_close(out, engine.logits(ids), rtol=1e-4, atol=1e-4)
        assert tokens == engine.greedy([1, 2, 3, 4], 4)
    finally:
        monkeypatch.undo()
        cpu.reset()
    assert cpu.available()


def test_switched_off_by_env(monkeypatch):
    monkeypatch.setenv(cpu.ENV_SWITCH, "0")
    cpu.reset()
    try:
        assert not cpu.available() and cpu.ENV_SWITCH in cpu.unavailable_reason()
        assert not ops.use_cpu_kernels(torch.zeros(1, 64), quantize(torch.randn(32, 64)))
    finally:
        monkeypatch.undo()
        cpu.reset()


def test_decode_steps_run_torch_on_one_thread(monkeypatch):
    seen = []
    before = torch.get_num_threads()
    ops.set_threads(2)
    try:
        with ops.decode_threads(torch.zeros(3, 1, dtype=torch.long)):   # one new token per sequence
            seen.append(torch.get_num_threads())
        with ops.decode_threads(torch.zeros(1, 5, dtype=torch.long)):   # a prompt keeps every thread
            seen.append(torch.get_num_threads())
        assert seen == [1, 2] and torch.get_num_threads() == 2 and cpu.get_threads() == 2
        with pytest.raises(ValueError, match="threads=0"):
            ops.set_threads(0)
    finally:
        torch.set_num_threads(before)


def test_decode_only_steps_sample_on_one_thread(tiny_engine, monkeypatch):
    """A decode-only scheduler step runs all of its torch ops (sampling too) on one thread: a parallel
    torch op leaves OpenMP workers spinning on the cores the kernels' pool needs (ops.small_ops_threads).
    A step that prefills keeps every thread."""
    from kimi_engine.runtime import scheduler
    seen = []
    sample = scheduler.sample
    monkeypatch.setattr(scheduler, "sample", lambda *a: seen.append(torch.get_num_threads()) or sample(*a))
    before = torch.get_num_threads()
    ops.set_threads(2)
    try:
        tiny_engine.generate([5, 6, 7], max_new_tokens=4, temperature=0.0)
        assert seen == [2, 1, 1, 1] and torch.get_num_threads() == 2   # the first token comes from the prompt's step
    finally:
        ops.set_threads(before)
