"""The `kimi-engine` command."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .checkpoint import Slot, check_checkpoint
from .config import ModelConfig
from .errors import CheckpointError


def _human(n: float, unit: str = "B") -> str:
    for prefix, scale in (("T", 1e12), ("G", 1e9), ("M", 1e6), ("k", 1e3)):
        if n >= scale:
            return f"{n / scale:,.2f} {prefix}{unit}"
    return f"{n:,.0f} {unit}"


def parameter_counts(config: ModelConfig, slots: dict[str, Slot]) -> tuple[int, int]:
    """(total, active per token) parameters; an INT4 weight counts as out x in parameters.

    Active: everything but the routed experts, plus num_experts_per_tok of each layer's experts.
    """
    total = routed = 0
    for key, slot in slots.items():
        if slot.kind in ("scale", "shape"):
            continue
        n = slot.shape[0] * slot.shape[1] * 8 if slot.kind == "packed" else _numel(slot.shape)
        total += n
        routed += n if ".experts." in key else 0
    active = total - routed
    if config.n_routed_experts:
        active += routed * config.num_experts_per_tok // config.n_routed_experts
    return total, active


def _numel(shape) -> int:
    n = 1
    for d in shape:
        n *= d
    return n


def inspect(path: Path) -> int:
    try:
        config, _, slots, infos = check_checkpoint(path)
    except CheckpointError as e:
        print(f"INVALID: {e}", file=sys.stderr)
        return 1
    c = config
    shards = sorted({info.file.name for info in infos.values()})
    routed = sum(i.nbytes for k, i in infos.items() if ".experts." in k)
    int4 = sum(i.nbytes for k, i in infos.items() if k.endswith(("weight_packed", "weight_scale", "weight_shape")))
    total, active = parameter_counts(config, slots)
    kv_per_token = (c.kv_lora_rank + c.qk_rope_head_dim) * c.num_hidden_layers * 2  # bf16 latent cache
    quant = (f"INT{c.quant.num_bits} group {c.quant.group_size} (compressed-tensors pack-quantized)"
             if c.quant else "none (all bf16)")
    print(f"checkpoint      {path}")
    print(f"architecture    {', '.join(c.architectures)} ({c.model_type}): {c.num_hidden_layers} layers "
          f"({c.first_k_dense_replace} dense), hidden {c.hidden_size}, vocab {c.vocab_size}")
    print(f"attention       MLA, {c.num_attention_heads} heads, q_lora {c.q_lora_rank}, kv_lora {c.kv_lora_rank}, "
          f"head dims nope {c.qk_nope_head_dim} + rope {c.qk_rope_head_dim}, v {c.v_head_dim}")
    print(f"experts         {c.n_routed_experts} routed (top-{c.num_experts_per_tok}, {c.n_group} groups, "
          f"top-{c.topk_group} groups) + {c.n_shared_experts} shared, intermediate {c.moe_intermediate_size}")
    rs = c.rope_scaling
    print(f"rope            theta {c.rope_theta:g}" + (f", YaRN x{rs['factor']:g} from {rs['original_max_position_embeddings']}"
                                                        if rs else "") + f", max positions {c.max_position_embeddings:,}")
    print(f"quantization    {quant}")
    print(f"shards          {len(shards)} files, {len(infos):,} tensors")
    print(f"bytes           {_human(sum(i.nbytes for i in infos.values()))} total: INT4 {_human(int4)} "
          f"(routed experts {_human(routed)}), bf16/other {_human(sum(i.nbytes for i in infos.values()) - int4)}")
    print(f"parameters      {_human(total, '')} total, {_human(active, '')} active per token")
    print(f"kv cache (bf16) {kv_per_token:,} bytes per token, {_human(kv_per_token * c.max_position_embeddings)} "
          f"per {c.max_position_embeddings:,}-token sequence")
    print("valid           yes: every tensor present, shapes, dtypes and weight_shape checked")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="kimi-engine", description="Run Kimi K2 Thinking from Python.")
    sub = parser.add_subparsers(dest="command", required=True)
    p = sub.add_parser("inspect", help="summarize and validate a checkpoint directory (reads headers only)")
    p.add_argument("path", type=Path)
    args = parser.parse_args(argv)
    if args.command == "inspect":
        return inspect(args.path)
    return 2


if __name__ == "__main__":
    sys.exit(main())
