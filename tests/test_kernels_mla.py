"""mla_decode (Triton, split-KV over the paged latent cache) against mla_decode_ref, and the reference
against a dense softmax over a contiguous gather.

Under the interpreter (no GPU) tl.dot runs in float32, so fp32 inputs agree to float32 rounding of
differently ordered sums (1e-5); bf16 inputs are upcast exactly and differ only by the final rounding
(one bf16 ulp, 2^-8 relative). On CUDA the dots take bf16 operands and p is rounded to bf16 before
p @ latent (2^-9 relative per term), hence atol/rtol 2e-2 there.
"""

import math
import sys
from pathlib import Path

import pytest
import torch

import kimi_engine
from kimi_engine.kernels.mla_decode import MIN_SPLIT_TOKENS, choose_num_splits, mla_decode, mla_decode_ref

# Kernels on CPU tensors: the interpreter (the `cuda` tests cover the compiled kernels on a GPU).
pytestmark = pytest.mark.interpreter

CUDA = pytest.mark.cuda
TOL = {torch.float32: dict(atol=1e-5, rtol=1e-5), torch.bfloat16: dict(atol=1e-2, rtol=1.6e-2),
       torch.float16: dict(atol=1e-3, rtol=1e-3)}
CUDA_TOL = dict(atol=2e-2, rtol=2e-2)


def paged_inputs(lens, H, C, R, block_size=16, dtype=torch.float32, fp8=False, device="cpu", seed=0):
    """Random queries and a shuffled paged cache for sequences of `lens` tokens; unused table slots = -1."""
    g = torch.Generator().manual_seed(seed)
    blocks = [math.ceil(n / block_size) for n in lens]
    num_blocks = sum(blocks) + 3                                   # spare blocks nobody owns
    kv = torch.randn(num_blocks, block_size, C + R, generator=g)
    kv_scale = None
    if fp8:
        kv_scale = 0.5 + torch.rand(num_blocks, block_size, 2, generator=g)
        kv = (kv * 16).to(torch.float8_e4m3fn)                   # use the format's range; scales undo it
        kv_scale = (kv_scale / 16).to(device)
    table = torch.full((len(lens), max(blocks) + 2), -1, dtype=torch.int32)
    ids, k = torch.randperm(num_blocks, generator=g).int(), 0
    for i, nb in enumerate(blocks):
        table[i, :nb], k = ids[k:k + nb], k + nb
    q_latent = torch.randn(len(lens), H, C, generator=g) / C ** 0.25
    q_rope = torch.randn(len(lens), H, R, generator=g) / R ** 0.25
    kv = kv.to(device) if fp8 else kv.to(device, dtype)
    return (q_latent.to(device, dtype), q_rope.to(device, dtype), kv, table.to(device),
            torch.tensor(lens, dtype=torch.int32, device=device), kv_scale)


def dense_attention(q_latent, q_rope, kv_cache, block_table, seq_lens, scale, kv_scale=None):
    """The textbook formula: gather each sequence contiguously, one plain softmax over all its tokens."""
    C, bs = q_latent.shape[2], kv_cache.shape[1]
    out = []
    for i, n in enumerate(seq_lens.tolist()):
        kv = kv_cache[block_table[i, : math.ceil(n / bs)].long()].flatten(0, 1)[:n].float()   # [n, C + R]
        if kv_scale is not None:
            sc = kv_scale[block_table[i, : math.ceil(n / bs)].long()].flatten(0, 1)[:n]
            kv = torch.cat([kv[:, :C] * sc[:, :1], kv[:, C:] * sc[:, 1:]], -1)
        scores = (q_latent[i].float() @ kv[:, :C].T + q_rope[i].float() @ kv[:, C:].T) * scale   # [H, n]
        out.append(scores.softmax(-1) @ kv[:, :C])
    return torch.stack(out).to(q_latent.dtype)


@pytest.mark.parametrize("lens,fp8", [([1, 7, 300], False), ([5000, 4097, 4096], False), ([900, 3], True)])
def test_reference_matches_dense_softmax(lens, fp8):
    args = paged_inputs(lens, H=4, C=32, R=8, fp8=fp8)             # 4097+ tokens: two reference tiles
    torch.testing.assert_close(mla_decode_ref(*args[:5], 0.3, kv_scale=args[5]),
                               dense_attention(*args[:5], 0.3, kv_scale=args[5]), atol=1e-5, rtol=1e-5)


# (lens, H, C, R, block_size, num_splits): num_splits None picks automatically.
CASES = [
    ([1], 4, 32, 8, 16, None),
    ([7], 4, 32, 8, 16, None),
    ([7], 5, 32, 8, 16, 5),                                          # 7 tokens over 5 splits: 4 empty
    ([1000], 4, 32, 8, 16, None),
    ([1000], 4, 32, 8, 64, 3),                                       # 3 does not divide 1000
    ([5000], 4, 32, 8, 64, None),
    ([5000], 4, 32, 8, 16, 7),
    ([1, 7, 1000, 63, 64, 65, 129], 5, 32, 8, 16, None),             # unequal lengths in one batch
    ([1, 700, 33], 4, 32, 8, 32, 4),
    ([100, 5], 20, 512, 64, 16, None),                               # Kimi's C and R; two head blocks
    ([17], 3, 48, 24, 16, 2),                                        # C, R off powers of two
]


@pytest.mark.parametrize("lens,H,C,R,block_size,num_splits", CASES)
def test_mla_decode_matches_reference(lens, H, C, R, block_size, num_splits):
    args = paged_inputs(lens, H, C, R, block_size, seed=len(CASES) * H + C + len(lens))
    out = mla_decode(*args[:5], 0.25, num_splits=num_splits)
    assert out.shape == (len(lens), H, C) and out.dtype == torch.float32
    torch.testing.assert_close(out, mla_decode_ref(*args[:5], 0.25), **TOL[torch.float32])


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_mla_decode_half_inputs(dtype):
    args = paged_inputs([300, 9], 4, 64, 16, 32, dtype=dtype)
    out = mla_decode(*args[:5], 0.125, num_splits=2)
    assert out.dtype == dtype
    torch.testing.assert_close(out, mla_decode_ref(*args[:5], 0.125), **TOL[dtype])


def test_mla_decode_fp8_cache():
    """float8_e4m3fn with per-token scales: the interpreter handles fp8 loads, so this runs on CPU."""
    q_latent, q_rope, kv, table, lens, scale = paged_inputs([600, 1, 64], 4, 32, 8, 16, fp8=True)
    out = mla_decode(q_latent, q_rope, kv, table, lens, 0.25, kv_scale=scale, num_splits=3)
    torch.testing.assert_close(out, mla_decode_ref(q_latent, q_rope, kv, table, lens, 0.25, kv_scale=scale),
                               **TOL[torch.float32])


def test_fp8_cache_needs_ada_or_hopper(monkeypatch, tmp_path):
    """Triton has no e4m3 conversion before sm_89: an A100 gets a clear error, at load time too."""
    from kimi_engine.kernels.mla_decode import check_fp8_kv_device
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (8, 0))
    with pytest.raises(ValueError, match="compute capability >= 8.9.*cuda:0 is 8.0"):
        check_fp8_kv_device(torch.device("cuda", 0))
    check_fp8_kv_device(torch.device("cpu"))
    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)     # an A100 machine, as far as load can tell
    with pytest.raises(ValueError, match="fp8"):
        kimi_engine.load(tmp_path, device="cuda", kv_fp8=True)          # before reading the checkpoint
    monkeypatch.setattr(torch.cuda, "get_device_capability", lambda device=None: (9, 0))
    check_fp8_kv_device(torch.device("cuda", 0))


def test_mla_decode_strided_queries():
    q_latent, q_rope, kv, table, lens, _ = paged_inputs([200, 50], 4, 32, 8)
    wide = torch.randn(2, 4, 2 * 32 + 8)                  # q_latent and q_rope as views of one projection
    wide[..., :32], wide[..., 64:] = q_latent, q_rope
    out = mla_decode(wide[..., :32], wide[..., 64:], kv, table, lens, 0.25)
    torch.testing.assert_close(out, mla_decode_ref(q_latent, q_rope, kv, table, lens, 0.25), **TOL[torch.float32])


def test_choose_num_splits():
    cpu = torch.device("cpu")                               # the interpreter's pretend SM count
    assert choose_num_splits(1, 1, 1, cpu) == 1
    assert choose_num_splits(MIN_SPLIT_TOKENS, 1, 1, cpu) == 1
    assert choose_num_splits(10 * MIN_SPLIT_TOKENS, 1, 1, cpu) > 1
    assert choose_num_splits(10 ** 6, 64, 1, cpu) == 1     # enough queries fill the machine alone


def test_mla_decode_rejects_bad_arguments():
    q_latent, q_rope, kv, table, lens, _ = paged_inputs([20], 4, 32, 8)
    with pytest.raises(ValueError, match="q_rope"):
        mla_decode(q_latent, q_rope[:, :3], kv, table, lens, 0.1)
    with pytest.raises(ValueError, match="kv_cache"):
        mla_decode(q_latent, q_rope, kv[..., :-1], table, lens, 0.1)
    with pytest.raises(ValueError, match="block_size"):
        mla_decode(q_latent, q_rope, kv[:, :12], table, lens, 0.1)
    with pytest.raises(ValueError, match="kv_scale"):
        mla_decode(q_latent, q_rope, kv, table, lens, 0.1, kv_scale=torch.ones(*kv.shape[:2], 2))
    with pytest.raises(ValueError, match="kv_scale"):
        mla_decode(q_latent, q_rope, kv.to(torch.float8_e4m3fn), table, lens, 0.1)
    with pytest.raises(ValueError, match="block_table"):
        mla_decode(q_latent, q_rope, kv, table.long(), lens, 0.1)
    with pytest.raises(ValueError, match="seq_lens"):
        mla_decode(q_latent, q_rope, kv, table, lens.long(), 0.1)
    with pytest.raises(ValueError, match="seq_lens"):
        mla_decode(q_latent, q_rope, kv, table, lens * 100, 0.1)  # past the block table's capacity
    with pytest.raises(TypeError, match="q_latent"):
        mla_decode(q_latent.int(), q_rope, kv, table, lens, 0.1)


def test_bench_attention_smoke(capsys):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))
    import bench_attention
    bench_attention.main(["--interpret", "--small"])
    assert "| context |" in capsys.readouterr().out


# ------------------------------------------------------------------------------------------ CUDA, Kimi dims
@CUDA
@pytest.mark.parametrize("lens", [[1], [7], [1000], [5000], [32768],
                                  [32768, 1, 7, 1000, 5000, 20000, 4097, 64]])   # batch 8, unequal
def test_mla_decode_cuda_kimi_dims(lens):
    args = paged_inputs(lens, 64, 512, 64, 64, dtype=torch.bfloat16, device="cuda")
    scale = 192 ** -0.5 * 2.005                             # Kimi's 1/sqrt(192) times YaRN's mscale^2
    torch.testing.assert_close(mla_decode(*args[:5], scale), mla_decode_ref(*args[:5], scale), **CUDA_TOL)


@CUDA
@pytest.mark.parametrize("H", [8, 16, 32, 128])           # tensor parallel slices; DeepSeek-V3's 128
def test_mla_decode_cuda_heads(H):
    args = paged_inputs([3000, 50, 1], H, 512, 64, 64, dtype=torch.bfloat16, device="cuda")
    torch.testing.assert_close(mla_decode(*args[:5], 0.1), mla_decode_ref(*args[:5], 0.1), **CUDA_TOL)


@CUDA
def test_mla_decode_cuda_fp8():
    q_latent, q_rope, kv, table, lens, scale = paged_inputs([8000, 300], 64, 512, 64, 64, dtype=torch.bfloat16,
                                                            fp8=True, device="cuda")
    torch.testing.assert_close(mla_decode(q_latent, q_rope, kv, table, lens, 0.1, kv_scale=scale),
                               mla_decode_ref(q_latent, q_rope, kv, table, lens, 0.1, kv_scale=scale), **CUDA_TOL)
