"""Checkpoint I/O: exact round trips, INT4 kept packed, and every kind of broken checkpoint named."""

import gc
import json
import mmap
import shutil
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from kimi_engine import CheckpointError, int4, load_model, read_headers, save_checkpoint
from kimi_engine.checkpoint import INDEX_FILE, checkpoint_state_dict
from kimi_engine.kernels import cpu
from kimi_engine.synthetic import random_state_dict, tiny_config

EXPERT = "model.layers.1.mlp.experts.3.up_proj"


@pytest.fixture(scope="module")
def good(tmp_path_factory):
    """A tiny INT4 checkpoint in several shards, and the float weights it was written from."""
    config = tiny_config()
    weights = random_state_dict(config, seed=0)
    path = save_checkpoint(weights, tmp_path_factory.mktemp("good"), config, max_shard_bytes=100_000)
    return path, config, weights


@pytest.fixture
def broken(good, tmp_path):
    path = tmp_path / "ckpt"
    shutil.copytree(good[0], path)
    return path


def _file_of(path, key):
    return path / json.loads((path / INDEX_FILE).read_text())["weight_map"][key]


def _rewrite(file, change):
    tensors = load_file(file)
    change(tensors)
    save_file(tensors, file)


def test_layout_is_kimis(good):
    path, config, _ = good
    index = json.loads((path / INDEX_FILE).read_text())
    shards = sorted(set(index["weight_map"].values()))
    assert len(shards) > 1 and shards[0] == f"model-00001-of-{len(shards):05d}.safetensors"
    assert index["metadata"]["total_size"] == sum(i.nbytes for i in read_headers(path).values())
    infos = read_headers(path)
    assert infos[f"{EXPERT}.weight_packed"].dtype == "I32" and infos[f"{EXPERT}.weight_packed"].shape == (32, 8)
    assert infos[f"{EXPERT}.weight_scale"].dtype == "BF16" and infos[f"{EXPERT}.weight_scale"].shape == (32, 2)
    with safe_open(_file_of(path, f"{EXPERT}.weight_shape"), "pt") as f:
        assert f.get_tensor(f"{EXPERT}.weight_shape").tolist() == [32, 64]
    # Attention, shared experts, the dense MLP and lm_head stay bf16, as the ignore list says.
    for key in ("model.layers.1.self_attn.kv_b_proj.weight", "model.layers.1.mlp.shared_experts.up_proj.weight",
                "model.layers.0.mlp.down_proj.weight", "lm_head.weight", "model.layers.1.mlp.gate.weight"):
        assert infos[key].dtype == "BF16", key
    assert infos["model.layers.1.mlp.gate.e_score_correction_bias"].dtype == "F32"


def test_load_keeps_int4_packed_and_exact(good):
    path, config, weights = good
    model, _ = load_model(path, dtype=torch.bfloat16, progress=False)
    experts = model.model.layers[1].mlp.experts
    assert experts.int4 and experts.gate_up_packed.dtype == torch.int32
    assert experts.gate_up_packed.shape == (8, 64, 8) and experts.down_scale.shape == (8, 64, 1)
    packed, scale = int4.quantize(weights[f"{EXPERT}.weight"], 32)
    assert torch.equal(experts.gate_up_packed[3, 32:], packed) and torch.equal(experts.gate_up_scale[3, 32:], scale)
    attn = model.model.layers[2].self_attn
    assert torch.equal(attn.kv_b_proj.weight, weights["model.layers.2.self_attn.kv_b_proj.weight"])


def _mapping_flags(address: int) -> list[str] | None:
    """The VmFlags of this process's mapping that holds address (None if none does)."""
    inside = False
    for line in Path("/proc/self/smaps").read_text().splitlines():
        head = line.split()[0]
        if "-" in head and not head.endswith(":"):
            start, end = (int(a, 16) for a in head.split("-"))
            inside = start <= address < end
        elif inside and head == "VmFlags:":
            return line.split()[1:]
    return None


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE") or not Path("/proc/self/smaps").exists(),
                    reason="transparent huge pages are a Linux madvise")
def test_cpu_weights_get_huge_page_memory_of_their_own():
    w = cpu.empty_weight((3, 1 << 20), torch.bfloat16)   # 6 MB
    assert w.shape == (3, 1 << 20) and w.dtype == torch.bfloat16 and w.is_contiguous()
    assert w.data_ptr() % cpu.HUGE_PAGE == 0 and "hg" in _mapping_flags(w.data_ptr())   # MADV_HUGEPAGE
    w.fill_(1.5)
    assert w.float().sum().item() == 1.5 * 3 * (1 << 20)
    address = w.data_ptr()
    del w
    gc.collect()
    assert _mapping_flags(address) is None   # unmapped with its tensor
    small = cpu.empty_weight((4, 5), torch.float32)   # under a huge page: ordinary memory
    assert small.shape == (4, 5) and small.dtype == torch.float32


@pytest.mark.skipif(not hasattr(mmap, "MADV_HUGEPAGE") or not Path("/proc/self/smaps").exists(),
                    reason="transparent huge pages are a Linux madvise")
def test_cpu_weight_memory_refused_huge_pages_is_ordinary(monkeypatch):
    monkeypatch.setattr(mmap, "MADV_HUGEPAGE", 9999)   # an advice no kernel knows: madvise fails (EINVAL)
    w = cpu.empty_weight((3, 1 << 20), torch.bfloat16)
    assert "hg" not in _mapping_flags(w.data_ptr())
    w.fill_(2.0)
    assert w.float().sum().item() == 2.0 * 3 * (1 << 20)


def test_cpu_load_allocates_every_parameter_as_a_weight(good, monkeypatch):
    made = []
    real = cpu.empty_weight
    monkeypatch.setattr(cpu, "empty_weight", lambda shape, dtype: made.append(real(shape, dtype)) or made[-1])
    model, _ = load_model(good[0], device="cpu")
    ptrs = {t.data_ptr() for t in made}
    assert len(made) == len(list(model.parameters())) and all(p.data_ptr() in ptrs for p in model.parameters())


def test_save_read_roundtrip_exact(good, tmp_path):
    path, config, _ = good
    model, _ = load_model(path, progress=False)
    again = save_checkpoint(model, tmp_path / "again", config)
    a, b = read_headers(path), read_headers(again)
    assert a.keys() == b.keys()
    for key in a:
        with safe_open(a[key].file, "pt") as f, safe_open(b[key].file, "pt") as g:
            assert torch.equal(f.get_tensor(key), g.get_tensor(key)), key
    assert json.loads((again / "config.json").read_text()) == json.loads((path / "config.json").read_text())


def _same_tensors(a, b):
    ha, hb = read_headers(a), read_headers(b)
    assert ha.keys() == hb.keys()
    for key in ha:
        with safe_open(ha[key].file, "pt") as f, safe_open(hb[key].file, "pt") as g:
            assert torch.equal(f.get_tensor(key), g.get_tensor(key)), key


def test_save_a_models_state_dict(good, tmp_path):
    """model.state_dict() holds routed experts in per-layer stacks (experts.gate_up_packed [E, 2I, D/8]):
    save_checkpoint takes it as it takes the model, and writes the same tensors."""
    path, config, _ = good
    model, _ = load_model(path, progress=False)
    state = model.state_dict()
    assert "model.layers.1.mlp.experts.gate_up_packed" in state
    _same_tensors(save_checkpoint(state, tmp_path / "from_state_dict", config), path)


def test_save_a_float_models_state_dict_quantizes_its_experts(tmp_path):
    """A float model's stacks (experts.gate_up_weight) under an INT4 config are quantized on the way out,
    exactly as the per-expert float weights are."""
    config = tiny_config()
    weights = random_state_dict(config, seed=4)
    float_config = config.replace(quantization_config=None)
    save_checkpoint(weights, tmp_path / "float", float_config)
    model, _ = load_model(tmp_path / "float", progress=False)
    assert "model.layers.2.mlp.experts.down_weight" in model.state_dict()
    _same_tensors(save_checkpoint(model.state_dict(), tmp_path / "int4", config),
                  save_checkpoint(weights, tmp_path / "reference", config))


def test_save_rejects_an_expert_given_twice_and_non_dicts(good, tmp_path):
    path, config, weights = good
    model, _ = load_model(path, progress=False)
    packed, _ = int4.quantize(weights[f"{EXPERT}.weight"], 32)
    state = {**model.state_dict(), f"{EXPERT}.weight_packed": packed}   # expert 3 also inside the stack
    with pytest.raises(CheckpointError, match=rf"{EXPERT}\.weight_packed' is given twice.*experts\.gate_up_packed"):
        save_checkpoint(state, tmp_path, config)
    with pytest.raises(TypeError, match="weights must be a Transformer or a state dict, got list"):
        save_checkpoint(list(weights.values()), tmp_path, config)


def test_all_bf16_single_file(tmp_path):
    config = tiny_config(quantization_config=None)
    weights = random_state_dict(config, seed=1)
    save_checkpoint(weights, tmp_path, config)
    # One model.safetensors without an index loads too.
    (tmp_path / INDEX_FILE).unlink()
    (tmp_path / "model-00001-of-00001.safetensors").rename(tmp_path / "model.safetensors")
    model, _ = load_model(tmp_path, progress=False)
    experts = model.model.layers[1].mlp.experts
    assert not experts.int4
    assert torch.equal(experts.gate_up_weight[2, :32], weights["model.layers.1.mlp.experts.2.gate_proj.weight"])
    assert torch.equal(checkpoint_state_dict(model)["model.layers.2.mlp.experts.7.down_proj.weight"],
                       weights["model.layers.2.mlp.experts.7.down_proj.weight"])


def test_float32_scales_and_int32_weight_shape_accepted(broken):
    def widen(tensors):
        for key, t in tensors.items():
            if key.endswith("weight_scale"):
                tensors[key] = t.float()
            elif key.endswith("weight_shape"):
                tensors[key] = t.int()
    for file in broken.glob("*.safetensors"):
        _rewrite(file, widen)
    model, _ = load_model(broken, progress=False)
    experts = model.model.layers[1].mlp.experts
    assert experts.gate_up_scale.dtype == torch.float32  # a stack is widened, never rounded


# Each broken checkpoint raises CheckpointError naming the file and the tensor or key at fault.
def _drop(key):
    return lambda t: t.pop(key)


def _add_unexpected(path, key):
    _rewrite(_file_of(path, "lm_head.weight"), lambda t: t.update({key: torch.zeros(1)}))
    index = json.loads((path / INDEX_FILE).read_text())
    index["weight_map"][key] = _file_of(path, "lm_head.weight").name
    (path / INDEX_FILE).write_text(json.dumps(index))


BREAKAGES = {
    "missing tensor": (f"{EXPERT}.weight_scale", lambda p, k: _rewrite(_file_of(p, k), _drop(k)), "weight_scale"),
    "wrong shape": ("model.layers.2.self_attn.o_proj.weight",
                    lambda p, k: _rewrite(_file_of(p, k), lambda t: t.update({k: t[k][:, :-1].contiguous()})), "shape"),
    "wrong dtype": (f"{EXPERT}.weight_packed",
                    lambda p, k: _rewrite(_file_of(p, k), lambda t: t.update({k: t[k].to(torch.int64)})), "dtype I64"),
    "bad weight_shape": (f"{EXPERT}.weight_shape",
                         lambda p, k: _rewrite(_file_of(p, k), lambda t: t.update({k: torch.tensor([32, 32])})), "implies"),
    "unexpected tensor": ("model.layers.0.mlp.extra.weight", _add_unexpected, "unexpected"),
    "truncated shard": ("lm_head.weight",
                        lambda p, k: _file_of(p, k).write_bytes(_file_of(p, k).read_bytes()[:-100]), "unreadable"),
    "corrupt header": ("lm_head.weight",
                       lambda p, k: _file_of(p, k).write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{bad header json"),
                       "unreadable"),
    "mixed scale dtypes": (f"{EXPERT}.weight_scale",
                           lambda p, k: _rewrite(_file_of(p, k), lambda t: t.update({k: t[k].float()})), "unlike"),
    "missing shard": ("lm_head.weight", lambda p, k: _file_of(p, k).unlink(), "shard file is missing"),
}


@pytest.mark.parametrize("case", BREAKAGES)
def test_broken_checkpoint_is_named(broken, case):
    key, breakage, why = BREAKAGES[case]
    file = _file_of(broken, "lm_head.weight" if case == "unexpected tensor" else key)
    breakage(broken, key)
    with pytest.raises(CheckpointError) as e:
        load_model(broken, progress=False)
    msg = str(e.value)
    assert why in msg
    assert file.name in msg or str(broken) in msg
    if case not in ("truncated shard", "corrupt header", "missing shard"):
        assert key in msg


def test_config_problems_are_named(broken):
    d = json.loads((broken / "config.json").read_text())
    d["quantization_config"]["config_groups"]["group_0"]["weights"]["num_bits"] = 3
    (broken / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match="config.json.*num_bits"):
        load_model(broken, progress=False)
    (broken / "config.json").write_text("{")
    with pytest.raises(CheckpointError, match="config.json.*invalid JSON"):
        load_model(broken, progress=False)
    (broken / "config.json").unlink()
    with pytest.raises(CheckpointError, match="config.json"):
        load_model(broken, progress=False)
    with pytest.raises(CheckpointError, match="not found"):
        load_model(broken / "nope", progress=False)


def test_quantization_mismatch_is_named(broken):
    # The config says bf16 everywhere, the files hold INT4 experts: the first expected tensor is named.
    d = json.loads((broken / "config.json").read_text())
    del d["quantization_config"]
    (broken / "config.json").write_text(json.dumps(d))
    with pytest.raises(CheckpointError, match=r"experts\.0\.gate_proj\.weight' is missing"):
        load_model(broken, progress=False)


def test_save_rejects_incomplete_weights(good, tmp_path):
    _, config, weights = good
    partial = dict(weights)
    del partial["model.norm.weight"]
    with pytest.raises(CheckpointError, match="model.norm.weight"):
        save_checkpoint(partial, tmp_path, config)
