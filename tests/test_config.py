"""ModelConfig mirrors config.json: every DeepSeek-V3 / Kimi key, unknown keys kept, bad values named."""

import json

import pytest

from kimi_engine import CheckpointError, ModelConfig
from kimi_engine.config import read_generation_config
from kimi_engine.synthetic import kimi_k2_config, tiny_config

from .conftest import FIXTURES, data_file

FIXTURE = FIXTURES / "kimi-k2-thinking" / "config.reconstructed.json"


def test_kimi_k2_thinking_config():
    cfg = ModelConfig.from_json(data_file(FIXTURE))
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
    assert kimi_k2_config(4).num_hidden_layers == 4                   # the package's own copy ...
    assert kimi_k2_config().to_dict() == cfg.to_dict()                # ... is the fixture


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


def _write_generation(tmp_path, d):
    (tmp_path / "generation_config.json").write_text(d if isinstance(d, str) else json.dumps(d))
    return tmp_path


def test_generation_config_sampling_defaults(tmp_path):
    # An HF-style file: token ids and max_length (prompt included) are not sampling defaults; null is unset.
    path = _write_generation(tmp_path, {
        "bos_token_id": 0, "eos_token_id": [1, 2], "max_length": 4096, "do_sample": True, "transformers_version": "4",
        "temperature": 1, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1,
        "max_new_tokens": 512, "typical_p": None})
    got = read_generation_config(path)
    assert got == {"temperature": 1.0, "top_p": 0.95, "top_k": 40, "min_p": 0.05, "repetition_penalty": 1.1,
                   "max_new_tokens": 512}
    assert type(got["temperature"]) is float and type(got["top_k"]) is int
    assert read_generation_config(path / "generation_config.json") == got          # the file itself
    unset_top_k = _write_generation(tmp_path, {"top_k": None, "temperature": 0})
    assert read_generation_config(unset_top_k) == {"temperature": 0.0}
    assert read_generation_config(_write_generation(tmp_path, {"max_length": 10})) == {}


def test_generation_config_absent(tmp_path):
    assert read_generation_config(tmp_path) == {}
    assert read_generation_config(tmp_path / "nowhere") == {}


@pytest.mark.parametrize("key, value", [
    ("temperature", -0.5), ("temperature", "hot"), ("temperature", True), ("temperature", float("nan")),
    ("top_p", 0), ("top_p", 1.5), ("top_k", -1), ("top_k", 2.5), ("min_p", 2), ("repetition_penalty", 0),
    ("max_new_tokens", 0), ("max_new_tokens", 10.0),
])
def test_generation_config_bad_value_names_file_and_key(tmp_path, key, value):
    path = _write_generation(tmp_path, {"temperature": 0.6, key: value})
    with pytest.raises(CheckpointError, match=rf"generation_config\.json: {key}=.* must be"):
        read_generation_config(path)


@pytest.mark.parametrize("text, match", [("{nope", "invalid JSON"), ("[1, 2]", "expected a JSON object")])
def test_generation_config_not_an_object(tmp_path, text, match):
    with pytest.raises(CheckpointError, match=rf"generation_config\.json: {match}"):
        read_generation_config(_write_generation(tmp_path, text))
