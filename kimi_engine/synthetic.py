"""Random checkpoints in the real format: for tests, benchmarks and trying the engine without a download.

    python -m kimi_engine.synthetic OUT_DIR [--full-width --layers 3]

Weights are random (never zero), scaled so activations stay O(1) through the layers; routed experts
are written INT4 through save_checkpoint, exactly as Kimi K2 Thinking ships them.
"""

from __future__ import annotations

import argparse
import json
from collections.abc import Iterator
from pathlib import Path

import torch

from .checkpoint import checkpoint_layout, save_checkpoint_stream
from .config import KIMI_QUANT, ModelConfig
from .model import Transformer


def tiny_config(**overrides) -> ModelConfig:
    """A few-layer Kimi-architecture config (dense first layer, MoE after, YaRN on, INT4 experts)."""
    d = dict(
        vocab_size=256, hidden_size=64, intermediate_size=128, moe_intermediate_size=32,
        num_hidden_layers=3, num_attention_heads=4, q_lora_rank=32, kv_lora_rank=32,
        qk_nope_head_dim=16, qk_rope_head_dim=8, v_head_dim=16,
        n_routed_experts=8, num_experts_per_tok=2, n_shared_experts=1, first_k_dense_replace=1,
        n_group=1, topk_group=1, norm_topk_prob=True, routed_scaling_factor=2.5,
        rope_theta=50000.0, max_position_embeddings=4096, rms_norm_eps=1e-5,
        rope_scaling=dict(type="yarn", factor=32.0, original_max_position_embeddings=128,
                          beta_fast=32.0, beta_slow=1.0, mscale=1.0, mscale_all_dim=1.0),
        bos_token_id=0, eos_token_id=1, tie_word_embeddings=False,
        quantization_config=KIMI_QUANT.to_dict(),
    )
    d.update(overrides)
    return ModelConfig.from_dict(d)


def kimi_k2_config(num_hidden_layers: int | None = None) -> ModelConfig:
    """Kimi K2 Thinking's full-width config (reconstructed; see shared fixtures), optionally fewer layers."""
    d = json.loads((Path(__file__).parent / "kimi_k2_thinking_config.json").read_text())
    if num_hidden_layers is not None:
        d["num_hidden_layers"] = num_hidden_layers
    return ModelConfig.from_dict(d)


def iter_random_weights(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16
                        ) -> Iterator[tuple[str, torch.Tensor]]:
    """Random float weights under checkpoint keys, one tensor at a time (`.weight` also for INT4
    modules: the writer quantizes). Projections have std 1/sqrt(fan_in), which keeps activations O(1)."""
    with torch.device("meta"):
        model = Transformer(config.replace(quantization_config=None))
    g = torch.Generator().manual_seed(seed)
    for key, slot in checkpoint_layout(model).items():
        if key.endswith("norm.weight"):
            t = 1.0 + 0.1 * torch.randn(slot.shape, generator=g)
        elif key.endswith("e_score_correction_bias"):
            t = 0.1 * torch.randn(slot.shape, generator=g)
        elif key.endswith("embed_tokens.weight"):
            t = torch.randn(slot.shape, generator=g)
        else:
            t = torch.randn(slot.shape, generator=g) * slot.shape[-1] ** -0.5
        yield key, t.to(torch.float32 if key.endswith("e_score_correction_bias") else dtype)


def random_state_dict(config: ModelConfig, seed: int = 0, dtype: torch.dtype = torch.bfloat16) -> dict[str, torch.Tensor]:
    """Random float weights under checkpoint keys (`.weight` also for INT4 modules: save_checkpoint quantizes)."""
    return dict(iter_random_weights(config, seed, dtype))


def write_random_checkpoint(path: str | Path, config: ModelConfig | None = None, seed: int = 0,
                            max_shard_bytes: int = 5 * 2**30, progress: bool = False) -> Path:
    """The weights of random_state_dict, written as they are drawn (memory: one shard, whatever the size)."""
    config = config or tiny_config()
    return save_checkpoint_stream(iter_random_weights(config, seed), path, config, max_shard_bytes, progress)


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out", type=Path)
    p.add_argument("--full-width", action="store_true", help="Kimi K2 Thinking's widths (needs --layers)")
    p.add_argument("--layers", type=int, default=None)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)
    config = kimi_k2_config(args.layers) if args.full_width else tiny_config(
        **({"num_hidden_layers": args.layers} if args.layers else {}))
    write_random_checkpoint(args.out, config, args.seed)
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
