"""The INT4 format: bit-identical to compressed-tensors, and quantization within half a step."""

import pytest
import torch

from kimi_engine import int4

ct = pytest.importorskip("compressed_tensors.compressors.pack_quantized.helpers")


@pytest.mark.parametrize("shape", [(1, 8), (3, 32), (17, 96), (64, 7168 // 8)])
def test_pack_matches_compressed_tensors(shape):
    g = torch.Generator().manual_seed(0)
    q = torch.randint(-8, 8, shape, generator=g, dtype=torch.int8)
    ours = int4.pack(q)
    theirs = ct.pack_to_int32(q, num_bits=4)
    assert ours.dtype == torch.int32 and ours.shape == (shape[0], shape[1] // 8)
    assert torch.equal(ours, theirs)
    assert torch.equal(int4.unpack(theirs), q)
    assert torch.equal(ct.unpack_from_int32(ours, 4, torch.Size(shape)), q)


def test_layout_is_offset_binary_little_nibble_first():
    # Column c sits in word c // 8 at bits 4 * (c % 8), stored as q + 8.
    q = torch.tensor([[-8, -1, 0, 1, 2, 3, 4, 7]], dtype=torch.int8)
    word = int4.pack(q).item() & 0xFFFFFFFF
    assert [(word >> (4 * c)) & 0xF for c in range(8)] == [v + 8 for v in q[0].tolist()]


def test_stacked_experts_roundtrip():
    q = torch.randint(-8, 8, (5, 6, 64), dtype=torch.int8)
    assert torch.equal(int4.unpack(int4.pack(q)), q)


@pytest.mark.parametrize("group_size", [8, 32, 64])
def test_quantize_within_half_step(group_size):
    g = torch.Generator().manual_seed(1)
    w = torch.randn(3, 48, 128, generator=g) * torch.rand(3, 48, 1, generator=g)
    w[0, 0, :group_size] = 0  # an all-zero group
    packed, scale = int4.quantize(w, group_size)
    assert packed.shape == (3, 48, 16) and scale.shape == (3, 48, 128 // group_size)
    assert scale.dtype == torch.bfloat16
    back = int4.dequantize(packed, scale)
    step = scale.float().repeat_interleave(group_size, dim=-1)
    assert torch.all((back - w).abs() <= step / 2 + 1e-7)
    assert torch.equal(back[0, 0, :group_size], torch.zeros(group_size))
    codes = int4.unpack(packed)
    assert codes.min() >= -7 and codes.max() <= 7  # symmetric range, as Kimi's own codes


def test_dequantize_formula():
    q = torch.randint(-8, 8, (4, 64), dtype=torch.int8)
    scale = torch.rand(4, 2).to(torch.bfloat16)
    w = int4.dequantize(int4.pack(q), scale)
    assert torch.equal(w, q.float() * scale.float().repeat_interleave(32, dim=1))


def test_bad_input():
    with pytest.raises(ValueError, match="multiple of 8"):
        int4.pack(torch.zeros(2, 7, dtype=torch.int8))
    with pytest.raises(ValueError, match=r"\[-8, 7\]"):
        int4.pack(torch.full((1, 8), 9, dtype=torch.int8))
    with pytest.raises(ValueError, match="group_size"):
        int4.quantize(torch.randn(2, 48), 32)
    with pytest.raises(TypeError, match="int32"):
        int4.unpack(torch.zeros(1, 1, dtype=torch.int64))
