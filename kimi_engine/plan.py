"""Will it fit, and how fast can it go: per-rank memory and the batch-1 decode floor of a sharded model.

    kimi-engine plan --config CONFIG --world-size 8 --gpu-memory 141 --context 262144 --batch 1

The bytes come from the model itself: one rank's shard (distributed.py) is built on the meta
device and its parameters are counted, so the plan always agrees with what `load` allocates.
Decode at batch 1 is memory bound: every step reads every weight a token touches and the whole KV
cache, so bytes read / HBM bandwidth is a floor on the time per token. GB here means 10^9 bytes.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .config import ModelConfig
from .parallel import Parallel
from .model import Transformer

GB = 1e9
BANDWIDTH = {"H100": 3.35e12, "H200": 4.8e12}   # HBM bytes/s (SXM spec sheets)
KINDS = ("attention", "dense MLP", "shared experts", "routed experts", "router", "embedding", "lm_head", "norms")


def weight_kind(name: str) -> str:
    """Which of KINDS a parameter (model name, e.g. model.layers.3.mlp.experts.gate_up_packed) belongs to."""
    if ".mlp.experts." in name:
        return "routed experts"
    if ".shared_experts." in name:
        return "shared experts"
    if ".mlp.gate." in name:
        return "router"
    if ".mlp." in name:
        return "dense MLP"
    if ".self_attn." in name:
        return "attention"
    if "embed_tokens" in name:
        return "embedding"
    return "lm_head" if name.startswith("lm_head") else "norms"


def experts_on_busiest_rank(n_experts: int, top_k: int, world_size: int) -> float:
    """E[max over ranks of the experts a token uses there]: top_k distinct experts drawn uniformly from
    n_experts, split evenly over world_size ranks (exact, by counting subsets)."""
    per_rank = n_experts // world_size
    total = math.comb(n_experts, top_k)

    def subsets_with_at_most(j: int) -> int:   # [x^top_k] (sum_{i<=j} C(per_rank, i) x^i)^world_size
        poly = [1]
        for _ in range(world_size):
            nxt = [0] * (top_k + 1)
            for a, ca in enumerate(poly):
                for i in range(min(j, per_rank, top_k - a) + 1):
                    nxt[a + i] += ca * math.comb(per_rank, i)
            poly = nxt
        return poly[top_k] if len(poly) > top_k else 0
    return sum(1 - subsets_with_at_most(j) / total for j in range(top_k))


@dataclass
class Plan:
    config: ModelConfig
    world_size: int
    gpu_memory: float            # bytes per GPU
    context: int                 # tokens per sequence
    batch: int                   # sequences held in the KV cache
    kv_fp8: bool
    weights: dict[str, int]      # bytes per rank, by kind
    kv_bytes_per_token: int      # all layers, one token (replicated on every rank)
    expert_bytes: int            # one routed expert of one layer (packed + scales)
    experts_mean: float          # experts a token uses per rank per MoE layer, on average
    experts_busiest: float       # ... on the busiest rank (the others wait for it at the all-reduce)

    @property
    def moe_layers(self) -> int:
        return self.config.num_hidden_layers - self.config.first_k_dense_replace

    @property
    def kv_bytes(self) -> int:
        return self.batch * self.context * self.kv_bytes_per_token

    @property
    def total(self) -> int:
        return sum(self.weights.values()) + self.kv_bytes

    @property
    def fits(self) -> bool:
        return self.total <= self.gpu_memory

    @property
    def max_batch(self) -> int:
        """Sequences of `context` tokens whose KV cache fits beside the weights."""
        return max(int((self.gpu_memory - sum(self.weights.values())) // (self.context * self.kv_bytes_per_token)), 0)

    @property
    def read_per_token(self) -> dict[str, int]:
        """Bytes one rank reads to decode one token of one sequence at `context` tokens, by kind."""
        c = self.config
        read = dict(self.weights)
        read["routed experts"] = round(self.experts_busiest * self.expert_bytes * self.moe_layers)
        if c.tie_word_embeddings:
            read["lm_head"] = self.weights["embedding"]   # the embedding is the output projection too
        read["embedding"] = c.hidden_size * 2         # one bf16 row
        read["KV cache"] = self.context * self.kv_bytes_per_token
        return read

    def floor_seconds(self, bandwidth: float) -> float:
        return sum(self.read_per_token.values()) / bandwidth


def plan(config: ModelConfig, world_size: int, gpu_memory_gb: float, context: int, batch: int = 1,
         kv_fp8: bool = False) -> Plan:
    """Per-rank bytes of `config` split over `world_size` GPUs (bf16 weights, INT4 where the config
    says), the KV cache for `batch` sequences of `context` tokens, and the batch-1 decode floor.
    ValueError if the config does not split evenly over world_size."""
    if world_size < 1 or context < 1 or batch < 1 or gpu_memory_gb <= 0:
        raise ValueError("world_size, context, batch and gpu_memory must be positive")
    parallel = Parallel(0, world_size)
    if world_size > 1:
        parallel.check(config)
    default = torch.get_default_dtype()
    torch.set_default_dtype(torch.bfloat16)   # float weights as they run; packed int32, router bias float32
    try:
        with torch.device("meta"):
            model = Transformer(config, parallel)
    finally:
        torch.set_default_dtype(default)
    weights = dict.fromkeys(KINDS, 0)
    for name, p in model.named_parameters():
        weights[weight_kind(name)] += p.numel() * p.element_size()
    per_layer = config.kv_lora_rank + config.qk_rope_head_dim
    kv_per_token = config.num_hidden_layers * (per_layer + 8 if kv_fp8 else per_layer * 2)  # fp8: 2 fp32 scales
    moe_layers = config.num_hidden_layers - config.first_k_dense_replace
    local_experts = config.n_routed_experts // world_size if moe_layers else 0
    expert_bytes = weights["routed experts"] // (moe_layers * local_experts) if moe_layers else 0
    k = config.num_experts_per_tok
    return Plan(config, world_size, gpu_memory_gb * GB, context, batch, kv_fp8, weights, kv_per_token, expert_bytes,
                experts_mean=k / world_size if moe_layers else 0.0,
                experts_busiest=experts_on_busiest_rank(config.n_routed_experts, k, world_size) if moe_layers else 0.0)


def format_plan(p: Plan) -> str:
    c, W = p.config, p.world_size

    def gb(n: float) -> str:
        return f"{n / GB:8.2f} GB"
    heads, vocab = c.num_attention_heads // W, c.vocab_size // W
    notes = {
        "attention": f"{heads} of {c.num_attention_heads} heads" + (": q_b, kv_b, o_proj split; q_a, kv_a replicated"
                                                                    if W > 1 else ""),
        "dense MLP": f"{c.first_k_dense_replace} layer(s), intermediate {c.intermediate_size // W:,} of {c.intermediate_size:,}",
        "shared experts": f"{p.moe_layers} layers, intermediate {c.moe_intermediate_size * c.n_shared_experts // W:,} "
                          f"of {c.moe_intermediate_size * c.n_shared_experts:,}",
        "routed experts": f"{p.moe_layers} layers x {c.n_routed_experts // W} of {c.n_routed_experts} experts "
                          f"x {p.expert_bytes / 1e6:.2f} MB" + (f" (INT{c.quant.num_bits}, group {c.quant.group_size})"
                                                                 if c.quant else ""),
        "router": "replicated: every rank routes every token" if W > 1 else "",
        "embedding": f"vocab {vocab:,} of {c.vocab_size:,}",
        "lm_head": "tied to the embedding" if c.tie_word_embeddings else f"vocab {vocab:,} of {c.vocab_size:,}",
        "norms": "replicated" if W > 1 else "",
    }
    kv_note = (f"{c.num_hidden_layers} layers x ({c.kv_lora_rank} + {c.qk_rope_head_dim}) x "
               + ("(1 B fp8 + 8 B of scales)" if p.kv_fp8 else "2 B") + f" = {p.kv_bytes_per_token:,} B/token")
    lines = [f"plan: {c.num_hidden_layers} layers, {c.n_routed_experts} experts top-{c.num_experts_per_tok}, "
             f"{c.num_attention_heads} heads on {W} GPU(s) of {p.gpu_memory / GB:g} GB; "
             f"{p.batch} x {p.context:,}-token sequence(s)",
             "", "memory per rank (every rank holds the same):"]
    lines += [f"  {kind:<15}{gb(p.weights[kind])}   {notes[kind]}".rstrip() for kind in KINDS]
    lines += [f"  {'weights':<15}{gb(sum(p.weights.values()))}",
              f"  {'KV cache':<15}{gb(p.kv_bytes)}   {p.batch} x {p.context:,} tokens x {p.kv_bytes_per_token:,} B "
              f"({kv_note})" + ("; replicated on every rank" if W > 1 else ""),
              f"  {'total':<15}{gb(p.total)}   of {p.gpu_memory / GB:g} GB; the weights leave room for the KV "
              f"cache of {p.max_batch} sequence(s) of {p.context:,} tokens"]
    left = p.gpu_memory - p.total
    lines.append(f"  fits: yes, {left / GB:.2f} GB left for activations, workspace and the CUDA context" if p.fits
                 else f"  fits: NO, {-left / GB:.2f} GB over; add GPUs, shorten --context, lower --batch or use --kv-fp8")

    read = p.read_per_token
    lines += ["", f"batch-1 decode floor: bytes one rank reads per token, at {p.context:,} tokens of context:"]
    read_notes = {
        "routed experts": f"{p.experts_busiest:.2f} experts x {p.expert_bytes / 1e6:.2f} MB x {p.moe_layers} layers "
                          f"(busiest rank; {p.experts_mean:.2f} on average)",
        "embedding": "one row",
        "lm_head": "all of this rank's vocabulary rows",
        "KV cache": f"{p.context:,} tokens x {p.kv_bytes_per_token:,} B: every rank reads the whole latent",
    }
    lines += [f"  {kind:<15}{gb(n)}   {read_notes.get(kind, 'all of this rank' + chr(39) + 's share')}"
              for kind, n in read.items()]
    total = sum(read.values())
    lines.append(f"  {'total':<15}{gb(total)}")
    for gpu, bw in BANDWIDTH.items():
        s = total / bw
        lines.append(f"  {gpu} ({bw / 1e12:.2f} TB/s): {total / GB:.2f} GB / {bw / 1e12:.2f} TB/s = "
                     f"{s * 1e3:.2f} ms/token, at most {1 / s:,.0f} tokens/s")
    lines.append(f"  experts: {c.num_experts_per_tok} of {c.n_routed_experts} per token, routed uniformly over {W} "
                 "rank(s); every rank waits for the busiest at each layer's all-reduce.")
    lines.append("  not counted: activations, the 2 all-reduces per layer and the logits all-gather, kernel efficiency.")
    return "\n".join(lines)
