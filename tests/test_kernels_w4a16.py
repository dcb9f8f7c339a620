"""w4a16_matmul (Triton) against w4a16_matmul_ref.

On CPU the kernel runs under TRITON_INTERPRET=1 in float32: the reference dequantizes exactly in
float32 too, so the two differ only by summation order (~1e-6 relative). On CUDA at bf16 both round
the dequantized weight to bf16 identically; the output's rounding (2^-8) and the order of the fp32
sums bound the difference.
"""

import pytest
import torch

from kimi_engine.int4 import quantize
from kimi_engine.kernels.w4a16 import W4A16_INTERPRET_CONFIGS, split_k, w4a16_matmul, w4a16_matmul_ref

# Kernels on CPU tensors: the interpreter (the `cuda` tests cover the compiled kernels on a GPU).
pytestmark = pytest.mark.interpreter


def make_weight(N, K, group_size=32, device="cpu", seed=0):
    g = torch.Generator().manual_seed(seed)
    packed, scale = quantize(torch.randn(N, K, generator=g), group_size)
    return packed.to(device), scale.to(device)


# (M, N, K, G): M=1 (GEMV body) and M>1 (tl.dot body); N, K off the interpreter tiles (32, 64).
SHAPES = [
    (1, 64, 256, 32),     # GEMV, several K steps
    (1, 50, 96, 32),      # GEMV, N and K tails, split-K (2 output tiles < 4 pretend SMs)
    (2, 24, 64, 8),       # smallest group the format allows
    (5, 33, 160, 32),     # odd M
    (16, 64, 128, 32),    # one row tile, split-K 2
    (33, 50, 96, 32),     # M=33: two row tiles, the second with one row
    (64, 96, 128, 64),    # group 64
]


@pytest.mark.parametrize("M,N,K,G", SHAPES)
def test_w4a16_matches_reference(M, N, K, G):
    packed, scale = make_weight(N, K, G)
    x = torch.randn(M, K, generator=torch.Generator().manual_seed(1))
    out = w4a16_matmul(x, packed, scale, group_size=G)
    assert out.shape == (M, N) and out.dtype == torch.float32
    torch.testing.assert_close(out, w4a16_matmul_ref(x, packed, scale), rtol=1e-5, atol=1e-4)


def test_split_k_is_exercised():
    # The shapes above must reach the split-K path too (partials summed in float32).
    block_k = W4A16_INTERPRET_CONFIGS[0][3]
    assert split_k(tiles=2, K=96, block_k=block_k, device=torch.device("cpu"))[0] == 2


def test_w4a16_strided_and_bf16_input():
    packed, scale = make_weight(40, 128)
    x = torch.randn(3, 256)[:, ::2]                       # non-contiguous rows
    torch.testing.assert_close(w4a16_matmul(x, packed, scale), w4a16_matmul_ref(x, packed, scale),
                               rtol=1e-5, atol=1e-4)
    xb = x.bfloat16()                                     # bf16 output: one rounding of ~2^-8 relative
    out = w4a16_matmul(xb, packed, scale)
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), w4a16_matmul_ref(xb.float(), packed, scale), rtol=1e-2, atol=1e-1)


def test_w4a16_rejects_bad_inputs():
    packed, scale = make_weight(16, 64)
    x = torch.randn(2, 64)
    with pytest.raises(ValueError, match="packed"):
        w4a16_matmul(torch.randn(2, 72), packed, scale)
    with pytest.raises(TypeError, match="packed must be int32"):
        w4a16_matmul(x, packed.long(), scale)
    with pytest.raises(ValueError, match="scale"):
        w4a16_matmul(x, packed, scale[:, :1])
    with pytest.raises(ValueError, match="group_size"):
        w4a16_matmul(x, packed, scale, group_size=12)
    with pytest.raises(TypeError, match="x must be"):
        w4a16_matmul(x.int(), packed, scale)


# Kimi K2 shapes (N, K): experts 2048x7168 / 7168x2048, dense MLP 18432x7168.
@pytest.mark.cuda
@pytest.mark.parametrize("M", [1, 8, 33, 512, 4096])
@pytest.mark.parametrize("N,K", [(2048, 7168), (7168, 2048), (18432, 7168), (50, 96)])
def test_w4a16_cuda_bf16(M, N, K):
    packed, scale = make_weight(N, K, device="cuda")
    x = torch.randn(M, K, device="cuda").bfloat16()
    out = w4a16_matmul(x, packed, scale)
    ref = w4a16_matmul_ref(x.float(), packed, scale)        # fp32 math on the same weights
    # bf16 output rounding (2^-8 relative) + bf16 rounding of the dequantized weight inside the dot
    torch.testing.assert_close(out.float(), ref, rtol=2e-2, atol=2e-2 * ref.abs().max().item())
