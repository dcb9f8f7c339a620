"""Our checkpoint as a llama.cpp GGUF (arch deepseek2, absorbed-MLA layout), for bench_cpu.py.

    experts_only=True:  routed experts Q4_0, everything else BF16 (norms, router F32): the same bits
                        as the checkpoint. Kimi's INT4 (nibble q + 8, one scale per 32 inputs) is
                        Q4_0 with the bf16 scale as fp16, so the experts convert exactly.
    experts_only=False: every matrix Q4_0 (quantized by kimi_engine.int4, symmetric), norms F32.

Names and metadata follow llama.cpp's deepseek2 loader: MLA as MQA over the latent (head_count_kv 1,
key_length C + R, value_length C), kv_b_proj split per head into attn_k_b [H, C, N] and attn_v_b
[H, V, C]. The vocabulary is a placeholder SPM list of the right size: the benchmark feeds token ids.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import torch
from safetensors import safe_open

from kimi_engine import int4
from kimi_engine.checkpoint import read_headers
from kimi_engine.config import ModelConfig

Q4_BLOCK = 32   # Q4_0: 32 weights, an fp16 scale and 16 bytes of nibbles (low nibbles: weights 0-15)


def q4_0_bytes(packed: torch.Tensor, scale: torch.Tensor) -> np.ndarray:
    """Kimi INT4 (packed int32 [..., N, K/8], scale [..., N, K/32]) -> Q4_0 blocks, uint8 [..., N, K/32 * 18]."""
    if packed.shape[-1] * int4.PACK_FACTOR // scale.shape[-1] != Q4_BLOCK:
        raise ValueError(f"Q4_0 needs a group size of {Q4_BLOCK}")
    nib = (int4.unpack(packed) + int4.NIBBLE_OFFSET).to(torch.uint8)             # [..., N, K]
    nib = nib.view(*nib.shape[:-1], -1, Q4_BLOCK)
    qs = nib[..., :16] | (nib[..., 16:] << 4)                                     # [..., N, K/32, 16]
    d = scale.float().to(torch.float16).contiguous().view(torch.uint8).view(*qs.shape[:-1], 2)
    return torch.cat([d, qs], -1).flatten(-2).numpy()


def bf16_bytes(t: torch.Tensor) -> np.ndarray:
    t = t.to(torch.bfloat16).contiguous()
    return t.view(torch.uint8).view(*t.shape[:-1], -1).numpy()


def _vocab(writer, config: ModelConfig, gguf) -> None:
    n = config.vocab_size
    tokens = ["<unk>", "<s>", "</s>"] + [f"<0x{b:02X}>" for b in range(256)]
    tokens += [f"t{i}" for i in range(len(tokens), n)]
    types = [gguf.TokenType.UNKNOWN, gguf.TokenType.CONTROL, gguf.TokenType.CONTROL] + [gguf.TokenType.BYTE] * 256
    types += [gguf.TokenType.NORMAL] * (n - len(types))
    writer.add_tokenizer_model("llama")
    writer.add_token_list(tokens[:n])
    writer.add_token_scores([0.0] * n)
    writer.add_token_types(types[:n])
    writer.add_bos_token_id(1)
    writer.add_eos_token_id(2)


def _metadata(writer, c: ModelConfig, gguf) -> None:
    writer.add_context_length(c.max_position_embeddings)
    writer.add_embedding_length(c.hidden_size)
    writer.add_block_count(c.num_hidden_layers)
    writer.add_feed_forward_length(c.intermediate_size)
    writer.add_head_count(c.num_attention_heads)
    writer.add_head_count_kv(1)
    writer.add_rope_freq_base(c.rope_theta)
    writer.add_layer_norm_rms_eps(c.rms_norm_eps)
    writer.add_vocab_size(c.vocab_size)
    writer.add_leading_dense_block_count(c.first_k_dense_replace)
    writer.add_q_lora_rank(c.q_lora_rank)
    writer.add_kv_lora_rank(c.kv_lora_rank)
    writer.add_key_length(c.kv_lora_rank + c.qk_rope_head_dim)
    writer.add_value_length(c.kv_lora_rank)
    writer.add_key_length_mla(c.qk_nope_head_dim + c.qk_rope_head_dim)
    writer.add_value_length_mla(c.v_head_dim)
    writer.add_rope_dimension_count(c.qk_rope_head_dim)
    writer.add_expert_count(c.n_routed_experts)
    writer.add_expert_used_count(c.num_experts_per_tok)
    writer.add_expert_shared_count(c.n_shared_experts)
    writer.add_expert_feed_forward_length(c.moe_intermediate_size)
    writer.add_expert_group_count(c.n_group)
    writer.add_expert_group_used_count(c.topk_group)
    writer.add_expert_weights_scale(c.routed_scaling_factor)
    writer.add_expert_weights_norm(c.norm_topk_prob)
    writer.add_expert_gating_func(gguf.ExpertGatingFuncType.SIGMOID)
    rs = c.rope_scaling
    if rs is not None:
        writer.add_rope_scaling_type(gguf.RopeScalingType.YARN)
        writer.add_rope_scaling_factor(rs["factor"])
        writer.add_rope_scaling_orig_ctx_len(rs["original_max_position_embeddings"])
        writer.add_rope_scaling_yarn_log_mul(0.1 * rs.get("mscale_all_dim", 1.0))


_NAMES = {
    "input_layernorm": "attn_norm", "post_attention_layernorm": "ffn_norm",
    "self_attn.q_a_proj": "attn_q_a", "self_attn.q_a_layernorm": "attn_q_a_norm", "self_attn.q_b_proj": "attn_q_b",
    "self_attn.q_proj": "attn_q", "self_attn.kv_a_proj_with_mqa": "attn_kv_a_mqa",
    "self_attn.kv_a_layernorm": "attn_kv_a_norm", "self_attn.o_proj": "attn_output",
    "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
    "mlp.shared_experts.gate_proj": "ffn_gate_shexp", "mlp.shared_experts.up_proj": "ffn_up_shexp",
    "mlp.shared_experts.down_proj": "ffn_down_shexp", "mlp.gate": "ffn_gate_inp",
}


def write_gguf(ckpt: str | Path, config: ModelConfig, out: str | Path, experts_only: bool) -> Path:
    import gguf

    c, out = config, Path(out)
    infos = read_headers(ckpt)
    files = {info.file for info in infos.values()}
    handles = {f: safe_open(f, "pt") for f in files}

    def get(key: str) -> torch.Tensor:
        return handles[infos[key].file].get_tensor(key)

    writer = gguf.GGUFWriter(str(out) + ".tmp", "deepseek2")
    _metadata(writer, c, gguf)
    _vocab(writer, c, gguf)
    writer.add_file_type(gguf.LlamaFileType.MOSTLY_BF16 if experts_only else gguf.LlamaFileType.MOSTLY_Q4_0)
    Q4, BF16 = gguf.GGMLQuantizationType.Q4_0, gguf.GGMLQuantizationType.BF16

    def matrix(name: str, w: torch.Tensor) -> None:
        if experts_only:
            writer.add_tensor(name, bf16_bytes(w), raw_dtype=BF16)
        else:
            writer.add_tensor(name, q4_0_bytes(*int4.quantize(w.float(), Q4_BLOCK)), raw_dtype=Q4)

    def vector(name: str, t: torch.Tensor) -> None:
        writer.add_tensor(name, t.float().numpy())

    matrix("token_embd.weight", get("model.embed_tokens.weight"))
    vector("output_norm.weight", get("model.norm.weight"))
    matrix("output.weight", get("lm_head.weight"))
    H, N, V = c.num_attention_heads, c.qk_nope_head_dim, c.v_head_dim
    for i in range(c.num_hidden_layers):
        p, b = f"model.layers.{i}.", f"blk.{i}."
        for ours, theirs in _NAMES.items():
            key = p + ours + ".weight"
            if key not in infos:
                continue
            t = get(key)
            if ours == "mlp.gate":
                vector(b + theirs + ".weight", t)       # the router stays float32, as llama.cpp's converter keeps it
            elif t.dim() == 1:
                vector(b + theirs + ".weight", t)
            else:
                matrix(b + theirs + ".weight", t)
        kv_b = get(p + "self_attn.kv_b_proj.weight").view(H, N + V, -1)
        matrix(b + "attn_k_b.weight", kv_b[:, :N].transpose(1, 2).contiguous())   # [H, C, N]
        matrix(b + "attn_v_b.weight", kv_b[:, N:].contiguous())                   # [H, V, C]
        if p + "mlp.gate.e_score_correction_bias" in infos:
            vector(b + "exp_probs_b.bias", get(p + "mlp.gate.e_score_correction_bias"))
        if p + "mlp.experts.0.gate_proj.weight_packed" in infos:
            for proj in ("gate", "up", "down"):
                packed = torch.stack([get(f"{p}mlp.experts.{e}.{proj}_proj.weight_packed") for e in range(c.n_routed_experts)])
                scale = torch.stack([get(f"{p}mlp.experts.{e}.{proj}_proj.weight_scale") for e in range(c.n_routed_experts)])
                writer.add_tensor(f"{b}ffn_{proj}_exps.weight", q4_0_bytes(packed, scale), raw_dtype=Q4)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    Path(str(out) + ".tmp").rename(out)
    return out
