"""The streaming checkpoint writer bench_cpu.py builds its model with, and the GGUF conversion of its peers."""

import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from kimi_engine.checkpoint import CheckpointError, read_headers, save_checkpoint, save_checkpoint_stream
from kimi_engine.int4 import dequantize, quantize
from kimi_engine.synthetic import iter_random_weights, random_state_dict, tiny_config, write_random_checkpoint

sys.path.insert(0, str(Path(__file__).parents[1] / "benchmarks"))


def tensors(path):
    out = {}
    for info in {i.file for i in read_headers(path).values()}:
        out.update(load_file(info))
    return out


def test_streaming_writer_equals_save_checkpoint(tmp_path):
    config = tiny_config()
    streamed = write_random_checkpoint(tmp_path / "stream", config, seed=5, max_shard_bytes=50_000)
    whole = save_checkpoint(random_state_dict(config, seed=5), tmp_path / "whole", config)
    a, b = tensors(streamed), tensors(whole)
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert len({i.file for i in read_headers(streamed).values()}) > 1   # several shards, one held at a time


def test_streaming_writer_rejects_bad_input(tmp_path):
    config = tiny_config()
    items = list(iter_random_weights(config))
    with pytest.raises(CheckpointError, match="missing"):
        save_checkpoint_stream(items[:-1], tmp_path / "a", config)
    with pytest.raises(CheckpointError, match="unexpected tensor 'extra.weight'"):
        save_checkpoint_stream(items + [("extra.weight", torch.zeros(2))], tmp_path / "b", config)
    with pytest.raises(CheckpointError, match="given twice"):
        save_checkpoint_stream(items + items[:1], tmp_path / "c", config)
    key, t = items[0]
    with pytest.raises(CheckpointError, match="has shape"):
        save_checkpoint_stream([(key, t[:1])] + items[1:], tmp_path / "d", config)


def test_q4_0_conversion_is_exact():
    gguf = pytest.importorskip("gguf")
    from cpu_gguf import q4_0_bytes
    packed, scale = quantize(torch.randn(3, 5, 64) * 0.1)
    blocks = q4_0_bytes(packed, scale)
    got = gguf.quants.dequantize(blocks, gguf.GGMLQuantizationType.Q4_0)
    assert torch.equal(torch.from_numpy(got).float(), dequantize(packed, scale))


def test_decode_bytes_counts_touched_experts(tmp_path):
    from bench_cpu import decode_bytes
    config = tiny_config()
    path = write_random_checkpoint(tmp_path / "c", config)
    infos = read_headers(path)
    experts = sum(i.nbytes for k, i in infos.items() if ".experts." in k and not k.endswith("weight_shape"))
    embed = infos["model.embed_tokens.weight"].nbytes
    others = sum(i.nbytes for i in infos.values()) - experts - embed
    want = others + embed // config.vocab_size + experts * config.num_experts_per_tok / config.n_routed_experts
    assert decode_bytes(path, config) == int(want)
    cache = config.num_hidden_layers * (config.kv_lora_rank + config.qk_rope_head_dim) * 2   # bf16, per token
    assert decode_bytes(path, config, context=100) == int(want) + 100 * cache


def test_prefill_flop_counts_what_a_token_meets(tmp_path):
    from bench_cpu import prefill_flop
    c = tiny_config()
    path = write_random_checkpoint(tmp_path / "c", c)
    D, H, T = c.hidden_size, c.num_attention_heads, 5
    attn = (c.q_lora_rank * D + H * (c.qk_nope_head_dim + c.qk_rope_head_dim) * c.q_lora_rank
            + (c.kv_lora_rank + c.qk_rope_head_dim) * D + H * (c.qk_nope_head_dim + c.v_head_dim) * c.kv_lora_rank
            + D * H * c.v_head_dim)
    moe_layers = c.num_hidden_layers - c.first_k_dense_replace
    experts = c.n_shared_experts + c.num_experts_per_tok   # the experts a token meets
    ffn = (c.first_k_dense_replace * 3 * D * c.intermediate_size
           + moe_layers * (c.n_routed_experts * D + 3 * D * c.moe_intermediate_size * experts))
    per_token = c.num_hidden_layers * attn + ffn
    scores = c.num_hidden_layers * H * (c.qk_nope_head_dim + c.qk_rope_head_dim + c.v_head_dim) * T * (T + 1) / 2
    assert prefill_flop(path, c, T) == pytest.approx(2 * (T * per_token + c.vocab_size * D + scores))
