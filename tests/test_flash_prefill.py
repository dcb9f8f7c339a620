"""Prefill attention through torch's CPU flash kernel (MLA._attend_flash) against attend_naive's float32
einsums (KIMI_ENGINE_KERNELS=torch): one tile and several, queries after a cached prefix (some of
them before a tile's first key), two rows at different positions, a single query."""

import pytest
import torch

from kimi_engine import ops
from kimi_engine.model import Transformer
from kimi_engine.synthetic import tiny_config


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("S,P,tile,B", [(7, 0, 64, 1), (5, 20, 8, 1), (9, 30, 16, 2), (1, 40, 16, 1)])
def test_flash_prefill_equals_the_einsums(monkeypatch, dtype, S, P, tile, B):
    g = torch.Generator().manual_seed(S + P)
    config = tiny_config()
    attn = Transformer(config).model.layers[0].self_attn.to(dtype)
    H, N, R, C = config.num_attention_heads, config.qk_nope_head_dim, config.qk_rope_head_dim, config.kv_lora_rank
    with torch.no_grad():
        attn.kv_b_proj.weight.copy_(torch.randn(attn.kv_b_proj.weight.shape, generator=g) * C ** -0.5)
    q_nope, q_rope = torch.randn(B, S, H, N, generator=g).to(dtype), torch.randn(B, S, H, R, generator=g).to(dtype)
    latent, k_rope = torch.randn(B, P + S, C, generator=g).to(dtype), torch.randn(B, P + S, R, generator=g).to(dtype)
    positions = torch.arange(P, P + S).repeat(B, 1)
    positions[1:] -= 3                       # the second row is 3 positions behind
    with torch.no_grad():
        assert ops.flash_attention_ok(q_nope)
        fast = attn.attend_naive(q_nope, q_rope, latent, k_rope, positions, kv_tile=tile)
        monkeypatch.setenv("KIMI_ENGINE_KERNELS", "torch")
        assert not ops.flash_attention_ok(q_nope)
        ref = attn.attend_naive(q_nope, q_rope, latent, k_rope, positions, kv_tile=tile)
    assert fast.dtype == dtype and fast.shape == ref.shape
    err = ((fast.float() - ref.float()).abs().max() / ref.float().abs().max()).item()
    assert err < (1e-5 if dtype == torch.float32 else 1e-2)   # bf16: the output and softmax weights rounded


def test_training_keeps_the_einsums():
    q = torch.randn(1, 2, 3, 4, requires_grad=True)
    assert not ops.flash_attention_ok(q)
    with torch.no_grad():
        assert ops.flash_attention_ok(q)
