"""ModelConfig: config.json of a DeepSeek-V3 / Kimi K2 checkpoint, key for key.

Field names are the config.json keys verbatim, so no translation table is needed.
Values derived from them are computed in __post_init__; unknown keys are kept in
`extra`. Runtime settings (device, max_seq_len, batch) are never part of it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from .errors import CheckpointError


@dataclass(frozen=True)
class QuantConfig:
    """compressed-tensors "pack-quantized" weights: symmetric INT-n, one scale per group of inputs.

    `targets` and `ignore` decide which Linear modules are quantized; entries starting
    with "re:" are regular expressions (re.match on the module name), others are exact
    module names or the class name "Linear".
    """

    num_bits: int = 4
    group_size: int = 32
    targets: tuple[str, ...] = ("Linear",)
    ignore: tuple[str, ...] = ()

    @classmethod
    def from_dict(cls, qc: dict, source: str = "config.json") -> "QuantConfig":
        where = f"{source}: quantization_config"
        if qc.get("quant_method") != "compressed-tensors":
            raise CheckpointError(f"{where}.quant_method={qc.get('quant_method')!r} is not supported (only 'compressed-tensors')")
        if qc.get("format") != "pack-quantized":
            raise CheckpointError(f"{where}.format={qc.get('format')!r} is not supported (only 'pack-quantized')")
        groups = qc.get("config_groups") or {}
        if len(groups) != 1:
            raise CheckpointError(f"{where}.config_groups: expected exactly one group, found {len(groups)}")
        (name, group), = groups.items()
        w = group.get("weights") or {}
        key = f"{where}.config_groups.{name}.weights"
        checks = {
            "num_bits": (w.get("num_bits"), 4),
            "type": (w.get("type"), "int"),
            "symmetric": (w.get("symmetric"), True),
            "strategy": (w.get("strategy"), "group"),
        }
        for k, (got, want) in checks.items():
            if got != want:
                raise CheckpointError(f"{key}.{k}={got!r} is not supported (only {want!r}: symmetric INT4 in groups)")
        if w.get("actorder") not in (None, False):
            raise CheckpointError(f"{key}.actorder={w.get('actorder')!r} is not supported")
        if group.get("input_activations") is not None:
            raise CheckpointError(f"{where}.config_groups.{name}.input_activations: activation quantization is not supported")
        gs = w.get("group_size")
        if not isinstance(gs, int) or gs <= 0 or gs % 8:
            raise CheckpointError(f"{key}.group_size={gs!r}: must be a positive multiple of 8")
        return cls(num_bits=4, group_size=gs, targets=tuple(group.get("targets") or ()), ignore=tuple(qc.get("ignore") or ()))

    def to_dict(self) -> dict:
        weights = dict(num_bits=self.num_bits, type="int", symmetric=True, strategy="group", group_size=self.group_size,
                       dynamic=False, actorder=None, block_structure=None, observer="minmax", observer_kwargs={})
        return {
            "quant_method": "compressed-tensors",
            "format": "pack-quantized",
            "quantization_status": "compressed",
            "kv_cache_scheme": None,
            "config_groups": {"group_0": {"targets": list(self.targets), "input_activations": None,
                                          "output_activations": None, "weights": weights}},
            "ignore": list(self.ignore),
        }

    def is_quantized(self, module_name: str) -> bool:
        """Whether the Linear module `module_name` (checkpoint key without `.weight`) is stored quantized."""
        def matches(pattern: str) -> bool:
            if pattern.startswith("re:"):
                return re.match(pattern[3:], module_name) is not None
            return pattern in ("Linear", module_name)
        return any(map(matches, self.targets)) and not any(map(matches, self.ignore))


# Kimi K2 Thinking's own quantization_config: routed experts INT4 (group 32), everything else bf16.
KIMI_QUANT = QuantConfig(group_size=32, targets=("Linear",), ignore=(
    "lm_head", r"re:.*self_attn.*", r"re:.*shared_experts.*", r"re:.*mlp\.(gate|up|gate_up|down)_proj.*"))


@dataclass
class ModelConfig:
    # shapes
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_hidden_layers: int
    num_attention_heads: int
    # mla
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    q_lora_rank: int | None = None  # None: a plain q_proj (DeepSeek-V2-Lite style)
    num_key_value_heads: int | None = None
    # moe
    n_routed_experts: int = 0
    num_experts_per_tok: int = 0
    moe_intermediate_size: int = 0
    n_shared_experts: int = 1
    first_k_dense_replace: int = 0
    moe_layer_freq: int = 1
    n_group: int = 1
    topk_group: int = 1
    norm_topk_prob: bool = True
    routed_scaling_factor: float = 1.0
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"
    # yarn
    rope_theta: float = 10000.0
    rope_scaling: dict | None = None
    max_position_embeddings: int = 4096
    # misc
    hidden_act: str = "silu"
    rms_norm_eps: float = 1e-6
    attention_bias: bool = False
    tie_word_embeddings: bool = False
    num_nextn_predict_layers: int = 0  # multi-token-prediction layers stored after the last layer; not run
    bos_token_id: int | None = None
    eos_token_id: int | list[int] | None = None
    pad_token_id: int | None = None
    torch_dtype: str = "bfloat16"
    model_type: str = "deepseek_v3"
    architectures: list[str] = field(default_factory=lambda: ["DeepseekV3ForCausalLM"])
    quantization_config: dict | None = None
    extra: dict[str, Any] = field(default_factory=dict)  # keys this engine does not use, kept for round trips

    # derived in __post_init__
    quant: QuantConfig | None = field(init=False, default=None)
    qk_head_dim: int = field(init=False, default=0)
    softmax_scale: float = field(init=False, default=0.0)

    REQUIRED = ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
                "kv_lora_rank", "qk_nope_head_dim", "qk_rope_head_dim", "v_head_dim")

    def __post_init__(self, source: str = "config.json"):
        def bad(key, why):
            raise CheckpointError(f"{source}: {key}={getattr(self, key)!r}: {why}")

        for key in self.REQUIRED:
            value = getattr(self, key)
            if not isinstance(value, int) or isinstance(value, bool) or value <= 0:
                bad(key, "must be a positive integer")
        if self.num_key_value_heads is None:
            self.num_key_value_heads = self.num_attention_heads
        if self.num_key_value_heads != self.num_attention_heads:
            bad("num_key_value_heads", f"MLA needs it equal to num_attention_heads={self.num_attention_heads}")
        if self.hidden_act != "silu":
            bad("hidden_act", "only 'silu' is supported")
        if not 0 <= self.first_k_dense_replace <= self.num_hidden_layers:
            bad("first_k_dense_replace", f"must lie in [0, num_hidden_layers={self.num_hidden_layers}]")
        if self.first_k_dense_replace < self.num_hidden_layers:  # there are MoE layers
            if self.scoring_func != "sigmoid":
                bad("scoring_func", "only 'sigmoid' is supported")
            if self.topk_method != "noaux_tc":
                bad("topk_method", "only 'noaux_tc' is supported")
            if self.moe_layer_freq != 1:
                bad("moe_layer_freq", "only 1 is supported")
            for key in ("n_routed_experts", "num_experts_per_tok", "moe_intermediate_size", "n_group", "topk_group"):
                if not isinstance(getattr(self, key), int) or getattr(self, key) <= 0:
                    bad(key, "must be a positive integer when the model has MoE layers")
            if self.n_routed_experts % self.n_group:
                bad("n_group", f"must divide n_routed_experts={self.n_routed_experts}")
            if self.topk_group > self.n_group:
                bad("topk_group", f"must be <= n_group={self.n_group}")
            if self.num_experts_per_tok > self.topk_group * (self.n_routed_experts // self.n_group):
                bad("num_experts_per_tok", "exceeds the experts in the topk_group selected groups")
        self.qk_head_dim = self.qk_nope_head_dim + self.qk_rope_head_dim
        self.softmax_scale = self.qk_head_dim ** -0.5 * self.yarn_mscale() ** 2
        if self.rope_scaling is not None:
            kind = self.rope_scaling.get("type", self.rope_scaling.get("rope_type"))
            if kind != "yarn":
                bad("rope_scaling", "only YaRN rope scaling (type 'yarn') is supported")
            for key in ("factor", "original_max_position_embeddings"):
                if key not in self.rope_scaling:
                    raise CheckpointError(f"{source}: rope_scaling.{key} is missing")
        self.quant = None
        if self.quantization_config is not None:
            self.quant = QuantConfig.from_dict(self.quantization_config, source)

    def yarn_mscale(self) -> float:
        """YaRN's attention factor sqrt-part: 0.1 * mscale_all_dim * ln(factor) + 1 (1.0 without YaRN).

        Applied squared to the softmax scale whenever rope_scaling is yarn, as HF and vLLM do.
        """
        rs = self.rope_scaling
        if not rs or not rs.get("mscale_all_dim") or rs["factor"] <= 1:
            return 1.0
        return 0.1 * rs["mscale_all_dim"] * math.log(rs["factor"]) + 1.0

    # ---------------------------------------------------------------------- queries
    def is_moe_layer(self, layer: int) -> bool:
        return layer >= self.first_k_dense_replace

    @property
    def eos_token_ids(self) -> list[int]:
        ids = self.eos_token_id
        return [] if ids is None else [ids] if isinstance(ids, int) else list(ids)

    # ---------------------------------------------------------------------- I/O
    @classmethod
    def from_dict(cls, d: dict, source: str = "config.json") -> "ModelConfig":
        names = {f.name for f in dataclasses.fields(cls) if f.init and f.name != "extra"}
        missing = [k for k in cls.REQUIRED if d.get(k) is None]
        if missing:
            raise CheckpointError(f"{source}: required key {missing[0]!r} is missing")
        known = {k: v for k, v in d.items() if k in names}
        extra = {k: v for k, v in d.items() if k not in names}
        cfg = cls.__new__(cls)
        for f in dataclasses.fields(cls):
            if f.init:
                default = f.default_factory() if f.default_factory is not dataclasses.MISSING else f.default
                setattr(cfg, f.name, known.get(f.name, default))
        cfg.extra = extra
        cfg.__post_init__(source)
        return cfg

    @classmethod
    def from_json(cls, path: str | Path) -> "ModelConfig":
        path = Path(path)
        if path.is_dir():
            path = path / "config.json"
        if not path.is_file():
            raise CheckpointError(f"{path}: config file not found")
        try:
            d = json.loads(path.read_text())
        except (json.JSONDecodeError, UnicodeDecodeError) as e:
            raise CheckpointError(f"{path}: invalid JSON ({e})") from None
        if not isinstance(d, dict):
            raise CheckpointError(f"{path}: expected a JSON object at the top level")
        return cls.from_dict(d, source=str(path))

    def to_dict(self) -> dict:
        d = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.init and f.name != "extra"}
        if d["quantization_config"] is None:
            del d["quantization_config"]
        return {**d, **self.extra}

    def replace(self, **changes) -> "ModelConfig":
        return ModelConfig.from_dict({**self.to_dict(), **changes})


# ------------------------------------------------------------------------- generation_config.json
GENERATION_CONFIG_FILE = "generation_config.json"


def _is_number(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


# The sampling defaults a checkpoint may recommend: key -> (valid?, what a valid value is, cast). The
# ranges are those generate() accepts (runtime/sampling.py), so a default read here never fails there.
GENERATION_DEFAULTS = {
    "temperature": (lambda v: _is_number(v) and v >= 0, "a number >= 0 (0 is greedy)", float),
    "top_p": (lambda v: _is_number(v) and 0 < v <= 1, "a number in (0, 1]", float),
    "top_k": (lambda v: _is_int(v) and v >= 0, "an integer >= 0 (0 is off)", int),
    "min_p": (lambda v: _is_number(v) and 0 <= v <= 1, "a number in [0, 1]", float),
    "repetition_penalty": (lambda v: _is_number(v) and v > 0, "a number > 0 (1 is off)", float),
    "max_new_tokens": (lambda v: _is_int(v) and v >= 1, "an integer >= 1", int),
}


def read_generation_config(path: str | Path) -> dict[str, Any]:
    """The sampling defaults a checkpoint recommends, from its generation_config.json (HF's file).

    path: the checkpoint directory, or the file itself. Returns the keys of GENERATION_DEFAULTS the file
    sets (temperature, top_p, top_k, min_p, repetition_penalty, max_new_tokens), named as generate()'s
    arguments: {} when the file is absent, a key left out when absent or null. Other keys (bos/eos ids,
    max_length, which counts the prompt too, do_sample) are ignored: like vLLM, the values are taken as
    the defaults for arguments the caller leaves unset, whatever do_sample says (checkpoints often set
    temperature without do_sample). A value out of range, or a file that is not a JSON object, raises
    CheckpointError naming the file and the key.
    """
    path = Path(path)
    if path.is_dir():
        path = path / GENERATION_CONFIG_FILE
    if not path.is_file():
        return {}
    try:
        d = json.loads(path.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise CheckpointError(f"{path}: invalid JSON ({e})") from None
    if not isinstance(d, dict):
        raise CheckpointError(f"{path}: expected a JSON object at the top level")
    out = {}
    for key, (valid, want, cast) in GENERATION_DEFAULTS.items():
        value = d.get(key)
        if value is None:
            continue
        if not valid(value):
            raise CheckpointError(f"{path}: {key}={value!r} must be {want}")
        out[key] = cast(value)
    return out
