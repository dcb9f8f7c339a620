"""ModelConfig mirrors config.json: every DeepSeek-V3 / Kimi key, unknown keys kept, bad values named."""

import json

import pytest

from kimi_engine import CheckpointError, ModelConfig
from kimi_engine.synthetic import kimi_k2_config, tiny_config

from .conftest import SHARED

FIXTURE = SHARED / "fixtures" / "kimi-k2-thinking" / "config.reconstructed.json"


@pytest.mark.skipif(not FIXTURE.exists(), reason="../shared not present")
def test_kimi_k2_thinking_config():
    cfg = ModelConfig.from_json(FIXTURE)
    assert (cfg.hidden_size, cfg.num_hidden_layers, cfg.n_routed_experts, cfg.num_experts_per_tok) == (7168, 61, 384, 8)
    assert cfg.qk_head_dim == 192 and cfg.kv_lora_rank == 512
    assert cfg.yarn_mscale() ** 2 == pytest.approx(2.005, abs=1e-3)   # 1 + 0.1 ln 64, squared
    assert cfg.softmax_scale == pytest.approx(192 ** -0.5 * cfg.yarn_mscale() ** 2)
    assert cfg.quant.group_size == 32
    assert cfg.quant.is_quantized("model.layers.1.mlp.experts.0.gate_proj")
    for name in ("lm_head", "model.layers.1.self_attn.q_a_proj", "model.layers.0.mlp.gate_proj",
                 "model.layers.5.mlp.shared_experts.down_proj"):
        assert not cfg.quant.is_quantized(name), name
    assert cfg.eos_token_ids == [163586]
    assert cfg.extra["seq_aux"] is True                               # unknown keys are kept
    assert ModelConfig.from_dict(cfg.to_dict()).to_dict() == cfg.to_dict()
    assert kimi_k2_config(4).num_hidden_layers == 4                   # the package's own copy


def _write(tmp_path, d):
    (tmp_path / "config.json").write_text(json.dumps(d))
    return tmp_path / "config.json"


def test_missing_key_is_named(tmp_path):
    d = tiny_config().to_dict()
    del d["kv_lora_rank"]
    with pytest.raises(CheckpointError, match="kv_lora_rank"):
        ModelConfig.from_json(_write(tmp_path, d))


@pytest.mark.parametrize("change, key", [
    (dict(n_group=3), "n_group"),                     # 8 experts do not split into 3 groups
    (dict(topk_group=2), "topk_group"),               # more groups kept than exist
    (dict(num_experts_per_tok=9), "num_experts_per_tok"),
    (dict(num_key_value_heads=2), "num_key_value_heads"),
    (dict(hidden_size=-1), "hidden_size"),
    (dict(scoring_func="softmax"), "scoring_func"),
    (dict(rope_scaling=dict(type="linear", factor=2.0)), "rope_scaling"),
])
def test_contradictions_are_named(tmp_path, change, key):
    with pytest.raises(CheckpointError, match=key):
        ModelConfig.from_json(_write(tmp_path, {**tiny_config().to_dict(), **change}))


@pytest.mark.parametrize("field, value", [("num_bits", 3), ("symmetric", False), ("strategy", "channel")])
def test_unsupported_quantization(tmp_path, field, value):
    d = tiny_config().to_dict()
    d["quantization_config"]["config_groups"]["group_0"]["weights"][field] = value
    with pytest.raises(CheckpointError, match=field):
        ModelConfig.from_json(_write(tmp_path, d))


def test_invalid_json(tmp_path):
    (tmp_path / "config.json").write_text("{not json")
    with pytest.raises(CheckpointError, match="config.json.*invalid JSON"):
        ModelConfig.from_json(tmp_path)
