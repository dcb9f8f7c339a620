"""INT4 (group-quantized, compressed-tensors layout) x bf16 matmul."""

from __future__ import annotations

import torch

from ..int4 import dequantize


def w4a16_matmul_ref(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ dequantize(packed [N, K/8], scale [N, K/G]).T -> [M, N] in x.dtype.

    The weight is dequantized to x.dtype first (as compressed-tensors' decompression does), then one
    matmul in x.dtype with float32 accumulation.
    """
    return x @ dequantize(packed, scale, x.dtype).T
