"""kimi-engine quantize: a bf16 checkpoint streamed into Kimi K2 Thinking's INT4 layout."""

import json

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import kimi_engine as ke
from kimi_engine import int4
from kimi_engine.checkpoint import INDEX_FILE, read_headers, save_checkpoint
from kimi_engine.cli import main
from kimi_engine.config import KIMI_QUANT
from kimi_engine.quantize import quantize_checkpoint
from kimi_engine.synthetic import random_state_dict, tiny_config

PROMPT = [5, 17, 99, 3, 42, 250, 7, 64]


@pytest.fixture
def bf16_checkpoint(tmp_path):
    config = tiny_config().replace(quantization_config=None)
    weights = random_state_dict(config, seed=4)
    path = save_checkpoint(weights, tmp_path / "bf16", config, max_shard_bytes=200_000)
    (path / "tokenizer_config.json").write_text("{}")            # the non-weight files travel along
    return path, weights, config


def tensor(path, key):
    info = read_headers(path)[key]
    with safe_open(info.file, "pt") as f:
        return f.get_tensor(key)


def test_quantize_equals_saving_with_kimi_quantization(bf16_checkpoint, tmp_path):
    src, weights, config = bf16_checkpoint
    dst = quantize_checkpoint(src, tmp_path / "int4", max_shard_bytes=150_000, progress=False)
    assert json.loads((dst / "config.json").read_text())["quantization_config"] == KIMI_QUANT.to_dict()
    assert (dst / "tokenizer_config.json").read_text() == "{}"
    assert len(set(json.loads((dst / INDEX_FILE).read_text())["weight_map"].values())) > 1
    assert not (tmp_path / "int4.partial").exists()

    headers = read_headers(dst)
    key = "model.layers.1.mlp.experts.3.down_proj"
    packed, scale = int4.quantize(weights[f"{key}.weight"], 32)
    assert torch.equal(tensor(dst, f"{key}.weight_packed"), packed)
    assert torch.equal(tensor(dst, f"{key}.weight_scale"), scale)
    assert tensor(dst, f"{key}.weight_shape").tolist() == list(weights[f"{key}.weight"].shape)
    for kept in ("model.layers.1.self_attn.kv_b_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight",
                 "model.layers.0.mlp.gate_proj.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight"):
        assert torch.equal(tensor(dst, kept), weights[kept])          # copied bit for bit
    assert not any(k.endswith("experts.0.gate_proj.weight") for k in headers)

    # The streamed result is the model save_checkpoint writes from the whole state dict in memory.
    whole = save_checkpoint(weights, tmp_path / "whole", config.replace(quantization_config=KIMI_QUANT.to_dict()))
    a = ke.load(dst, device="cpu", dtype=torch.float32, progress=False).logits(PROMPT)
    b = ke.load(whole, device="cpu", dtype=torch.float32, progress=False).logits(PROMPT)
    assert torch.equal(a, b)


def test_quantize_refuses_bad_input_and_writes_nothing(bf16_checkpoint, tmp_path):
    src, _, _ = bf16_checkpoint
    with pytest.raises(ke.CheckpointError, match="group_size=64"):
        quantize_checkpoint(src, tmp_path / "g64", group_size=64, progress=False)   # experts have 32 inputs
    assert not (tmp_path / "g64").exists() and not (tmp_path / "g64.partial").exists()
    done = quantize_checkpoint(src, tmp_path / "int4", progress=False)
    with pytest.raises(ke.CheckpointError, match="already quantized"):
        quantize_checkpoint(done, tmp_path / "again", progress=False)
    with pytest.raises(ke.CheckpointError, match="already exists"):
        quantize_checkpoint(src, done, progress=False)
    with pytest.raises(ValueError, match="device"):
        quantize_checkpoint(src, tmp_path / "dev", device="nonsense", progress=False)
    assert not (tmp_path / "dev").exists() and not (tmp_path / "dev.partial").exists()
    shard = next(src.glob("model-00002-*.safetensors"))
    shard.write_bytes(shard.read_bytes()[:100])                     # truncated: caught before writing
    with pytest.raises(ke.CheckpointError, match=shard.name):
        quantize_checkpoint(src, tmp_path / "broken", progress=False)
    assert not (tmp_path / "broken").exists() and not (tmp_path / "broken.partial").exists()


def test_cli_quantize(bf16_checkpoint, tmp_path, capsys):
    src, _, _ = bf16_checkpoint
    assert main(["quantize", str(src), str(tmp_path / "out")]) == 0
    out = capsys.readouterr().out
    assert "wrote" in out and "INT4" in out
    assert main(["quantize", str(src), str(tmp_path / "out")]) == 1
    assert "already exists" in capsys.readouterr().err


def test_multi_token_prediction_experts_follow_the_rule(tmp_path):
    # DeepSeek-V3-style checkpoints store an MTP layer after the last one; the engine skips it, but its
    # experts must still be INT4 under the written quantization_config, and the rest copied.
    config = tiny_config(num_nextn_predict_layers=1).replace(quantization_config=None)
    src = save_checkpoint(random_state_dict(config, seed=1), tmp_path / "bf16", config)
    mtp = {"model.layers.3.mlp.experts.0.down_proj.weight": torch.randn(64, 32, dtype=torch.bfloat16),
           "model.layers.3.eh_proj.weight": torch.randn(64, 128, dtype=torch.bfloat16)}
    save_file(mtp, src / "mtp.safetensors")
    index = json.loads((src / INDEX_FILE).read_text())
    index["weight_map"].update(dict.fromkeys(mtp, "mtp.safetensors"))
    (src / INDEX_FILE).write_text(json.dumps(index))
    dst = quantize_checkpoint(src, tmp_path / "int4", progress=False)
    headers = read_headers(dst)
    packed, scale = int4.quantize(mtp["model.layers.3.mlp.experts.0.down_proj.weight"], 32)
    assert torch.equal(tensor(dst, "model.layers.3.mlp.experts.0.down_proj.weight_packed"), packed)
    assert torch.equal(tensor(dst, "model.layers.3.eh_proj.weight"), mtp["model.layers.3.eh_proj.weight"])
    assert "model.layers.3.mlp.experts.0.down_proj.weight" not in headers
    assert not (dst / "mtp.safetensors").exists()                  # its tensors moved into the new shards
