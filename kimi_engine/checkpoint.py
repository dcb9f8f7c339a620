"""Read and write checkpoint directories in the published Kimi K2 layout.

    config.json, model.safetensors.index.json + model-0000K-of-0000N.safetensors (or one model.safetensors)

Loading validates everything first (every tensor the config implies is present, nothing unexpected,
shapes, dtypes and INT4 `weight_shape` values right) from the shard headers, then builds the model
on the meta device, allocates it once on the target device and copies tensors in one at a time from
memory-mapped shards. INT4 weights stay packed; routed experts land in per-layer stacks. One rank
of a tensor/expert-parallel model (distributed.py) reads only its slices and its own experts.
Any problem raises CheckpointError naming the file and the tensor or key. Never unpickles.
"""

from __future__ import annotations

import json
import re
from collections.abc import Mapping
from dataclasses import dataclass
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file
from torch import nn
from tqdm.auto import tqdm

from . import int4
from .config import ModelConfig
from .errors import CheckpointError
from .kernels import cpu
from .model import Transformer

if TYPE_CHECKING:
    from .parallel import Parallel

INDEX_FILE = "model.safetensors.index.json"
SINGLE_FILE = "model.safetensors"

# Allowed dtypes in the file, per kind of tensor, and what each kind becomes in memory.
FLOAT_DTYPES = {"BF16", "F16", "F32"}
FILE_DTYPES = {"float": FLOAT_DTYPES, "scale": FLOAT_DTYPES, "bias": FLOAT_DTYPES, "packed": {"I32"}, "shape": {"I32", "I64"}}
TORCH_DTYPES = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32, "I32": torch.int32, "I64": torch.int64}

# A stacked expert tensor of the model and the checkpoint tensors it gathers.
_STACKED = re.compile(r"^(?P<prefix>.+\.experts)\.(?P<part>gate_up|down)_(?P<kind>weight|packed|scale)$")
_FILE_SUFFIX = {"weight": "weight", "packed": "weight_packed", "scale": "weight_scale"}


@dataclass(frozen=True)
class Slot:
    """Where checkpoint tensor `key` goes: model parameter `param`, at `index` (None: all of it).

    shape is the tensor's shape in the checkpoint; `source` the part of it this rank reads (None: all).
    """
    param: str | None       # None for weight_shape entries, which are checked, not stored
    index: tuple | None
    shape: tuple[int, ...]
    kind: str               # float | packed | scale | bias | shape
    source: tuple[slice, ...] | None = None

    def read_numel(self) -> int:
        """Elements read from the checkpoint tensor: all of `shape`, or the `source` part of it."""
        n = 1
        for i, d in enumerate(self.shape):
            n *= len(range(d)[self.source[i]]) if self.source and i < len(self.source) else d
        return n


def _kind(param_name: str) -> str:
    if param_name.endswith("packed"):
        return "packed"
    if param_name.endswith("scale"):
        return "scale"
    if param_name.endswith("e_score_correction_bias"):
        return "bias"
    return "float"


def _shard(module: nn.Module, shape: tuple[int, ...]) -> tuple[tuple[int, ...], tuple[slice, ...] | None]:
    """(checkpoint shape, the slice of it held) of a parameter of `module` with this `shape`.

    A module split across ranks (`shard_dim` set, see distributed.py) holds block `rank` of
    world_size equal blocks along that dim, for each of its parameters (INT4 packed and scale too).
    """
    dim = getattr(module, "shard_dim", None)
    if dim is None:
        return shape, None
    n, rank, world = shape[dim], module.parallel.rank, module.parallel.world_size
    return shape[:dim] + (n * world,) + shape[dim + 1:], (slice(None),) * dim + (slice(rank * n, (rank + 1) * n),)


def checkpoint_layout(model: Transformer) -> dict[str, Slot]:
    """Every checkpoint key the model expects, in model order, with its shape and destination.

    For one rank of a parallel model: the keys it holds (its own experts only), with their slices.
    """
    slots: dict[str, Slot] = {}
    for name, p in model.named_parameters():
        m = _STACKED.match(name)
        if m is None:
            shape, source = _shard(model.get_submodule(name.rpartition(".")[0]), tuple(p.shape))
            slots[name] = Slot(name, None, shape, _kind(name), source)
            continue
        kind, rows = m["kind"], p.shape[1]
        parts = ([("gate", slice(0, rows // 2)), ("up", slice(rows // 2, rows))] if m["part"] == "gate_up"
                 else [("down", slice(0, rows))])
        first = model.get_submodule(m["prefix"]).first_expert   # expert parallel: the stack's first global id
        for e in range(p.shape[0]):
            for proj, sl in parts:
                key = f"{m['prefix']}.{first + e}.{proj}_proj.{_FILE_SUFFIX[kind]}"
                slots[key] = Slot(name, (e, sl), (sl.stop - sl.start,) + tuple(p.shape[2:]), _kind(name))
    for key, slot in list(slots.items()):
        if slot.kind == "packed":  # every INT4 module also carries weight_shape = [out, in]
            slots[key.removesuffix("weight_packed") + "weight_shape"] = Slot(None, None, (2,), "shape")
    return slots


def _packed_key(shape_key: str) -> str:
    return shape_key.removesuffix("weight_shape") + "weight_packed"


def _expected_weight_shape(slots: dict[str, Slot], shape_key: str) -> list[int]:
    out, words = slots[_packed_key(shape_key)].shape
    return [out, words * int4.PACK_FACTOR]


# ------------------------------------------------------------------------------------------ reading
@dataclass(frozen=True)
class TensorInfo:
    file: Path
    dtype: str              # safetensors name: BF16, F32, I32, ...
    shape: tuple[int, ...]

    @property
    def itemsize(self) -> int:
        return TORCH_DTYPES[self.dtype].itemsize if self.dtype in TORCH_DTYPES else 1

    @property
    def nbytes(self) -> int:
        n = self.itemsize
        for d in self.shape:
            n *= d
        return n


def _shard_files(path: Path) -> tuple[list[Path], dict[str, Path] | None]:
    """The shard files and, from the index, which file each tensor is in (None for a single file)."""
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
            if not isinstance(weight_map, dict):
                raise TypeError("weight_map is not an object")
        except (json.JSONDecodeError, UnicodeDecodeError, KeyError, TypeError) as e:
            raise CheckpointError(f"{index}: invalid index ({type(e).__name__}: {e})") from None
        files = {name: path / name for name in sorted(set(weight_map.values()))}
        for name, file in files.items():
            if not file.is_file():
                key = next(k for k, v in weight_map.items() if v == name)
                raise CheckpointError(f"{file}: shard file is missing (listed in {INDEX_FILE} for {key!r} and others)")
        return list(files.values()), {k: files[v] for k, v in weight_map.items()}
    single = path / SINGLE_FILE
    if single.is_file():
        return [single], None
    raise CheckpointError(f"{path}: no {INDEX_FILE} or {SINGLE_FILE} found")


def read_headers(path: str | Path) -> dict[str, TensorInfo]:
    """Name, dtype and shape of every tensor in the checkpoint, from the shard headers (reads no data).

    Fails on a missing, truncated or corrupt shard and on an index that disagrees with the shards.
    """
    path = Path(path)
    files, weight_map = _shard_files(path)
    infos: dict[str, TensorInfo] = {}
    for file in files:
        try:
            with safe_open(file, framework="pt") as f:
                for key in f.keys():
                    s = f.get_slice(key)
                    if key in infos:
                        raise CheckpointError(f"{file}: tensor {key!r} is also in {infos[key].file.name}")
                    infos[key] = TensorInfo(file, s.get_dtype(), tuple(s.get_shape()))
        except SafetensorError as e:
            raise CheckpointError(f"{file}: unreadable safetensors file ({e})") from None
    if weight_map is not None:
        for key, file in weight_map.items():
            if key not in infos or infos[key].file != file:
                raise CheckpointError(f"{file}: tensor {key!r} listed in {INDEX_FILE} is not in this shard")
        for key, info in infos.items():
            if key not in weight_map:
                raise CheckpointError(f"{info.file}: tensor {key!r} is not listed in {INDEX_FILE}")
    return infos


def _is_mtp_key(key: str, config: ModelConfig) -> bool:
    """Multi-token-prediction layers are stored after the last layer; the engine does not run them."""
    m = re.match(r"model\.layers\.(\d+)\.", key)
    return m is not None and config.num_hidden_layers <= int(m[1]) < config.num_hidden_layers + config.num_nextn_predict_layers


def validate(slots: dict[str, Slot], infos: dict[str, TensorInfo], config: ModelConfig, where: Path) -> None:
    """Raise CheckpointError unless `infos` holds exactly the tensors `slots` expects, in the right shapes and dtypes."""
    missing = [k for k in slots if k not in infos]
    if missing:
        more = f" (and {len(missing) - 1} more)" if len(missing) > 1 else ""
        raise CheckpointError(f"{where}: tensor {missing[0]!r} is missing{more}")
    for key, info in infos.items():
        if key not in slots and not _is_mtp_key(key, config):
            raise CheckpointError(f"{info.file}: unexpected tensor {key!r} (not implied by config.json"
                                  " and its quantization_config)")
    for key, slot in slots.items():
        info = infos[key]
        if info.dtype not in FILE_DTYPES[slot.kind]:
            raise CheckpointError(f"{info.file}: tensor {key!r} has dtype {info.dtype}, expected one of "
                                  f"{sorted(FILE_DTYPES[slot.kind])}")
        if info.shape != slot.shape:
            raise CheckpointError(f"{info.file}: tensor {key!r} has shape {list(info.shape)}, expected {list(slot.shape)}")
    stack_dtype: dict[str, str] = {}
    for key, slot in slots.items():
        if slot.index is not None and stack_dtype.setdefault(slot.param, infos[key].dtype) != infos[key].dtype:
            raise CheckpointError(f"{infos[key].file}: tensor {key!r} has dtype {infos[key].dtype}, unlike the "
                                  f"other tensors stacked into {slot.param!r} ({stack_dtype[slot.param]})")


def _check_weight_shapes(slots: dict[str, Slot], infos: dict[str, TensorInfo]) -> None:
    by_file: dict[Path, list[str]] = {}
    for key, slot in slots.items():
        if slot.kind == "shape":
            by_file.setdefault(infos[key].file, []).append(key)
    for file, keys in by_file.items():
        with safe_open(file, framework="pt") as f:
            for key in keys:
                got, want = f.get_tensor(key).tolist(), _expected_weight_shape(slots, key)
                if got != want:
                    raise CheckpointError(f"{file}: tensor {key!r} holds {got}, but {_packed_key(key)!r} "
                                          f"implies {want}")


def _memory_dtype(slot: Slot, info: TensorInfo, dtype: torch.dtype) -> torch.dtype:
    """float weights take the run dtype; scales keep bf16 or widen to float32; the router bias is float32."""
    if slot.kind == "float":
        return dtype
    if slot.kind == "scale":
        return torch.bfloat16 if info.dtype == "BF16" else torch.float32
    if slot.kind == "bias":
        return torch.float32
    return TORCH_DTYPES[info.dtype]


def check_checkpoint(path: str | Path, parallel: Parallel | None = None
                     ) -> tuple[ModelConfig, Transformer, dict[str, Slot], dict[str, TensorInfo]]:
    """Validate a checkpoint directory from its config and shard headers, reading no weights.

    Returns the config, the model built on the meta device, its layout and the tensors found. With
    `parallel` (world_size > 1): the whole checkpoint is validated, but the model and layout are this
    rank's, and only its INT4 weight_shape values are read.
    """
    path = Path(path)
    if not path.is_dir():
        raise CheckpointError(f"{path}: checkpoint directory not found")
    config = ModelConfig.from_json(path / "config.json")
    infos = read_headers(path)
    parallel = parallel if parallel is not None and parallel.world_size > 1 else None
    try:
        if parallel is not None:
            parallel.check(config)   # the config's heads, widths, experts and vocabulary split evenly
        with torch.device("meta"):
            full = Transformer(config)
            model = full if parallel is None else Transformer(config, parallel)
    except ValueError as e:
        raise CheckpointError(f"{path / 'config.json'}: {e}") from None
    validate(checkpoint_layout(full), infos, config, path)   # a rank, too, checks the whole checkpoint
    slots = checkpoint_layout(model)
    _check_weight_shapes(slots, infos)
    return config, model, slots, infos


def load_model(path: str | Path, device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16,
               progress: bool = True, parallel: Parallel | None = None) -> tuple[Transformer, ModelConfig]:
    """Validate and load a checkpoint directory -> (model on `device`, config). See the module docstring.

    parallel: load one rank's shard of the model (distributed.py); it reads only that rank's bytes.
    """
    path = Path(path)
    device = torch.device(device or "cpu")
    config, model, slots, infos = check_checkpoint(path, parallel)

    # Allocate every parameter once, on the device, in its memory dtype (nothing exists twice; on
    # CPU in huge pages, which the decode kernels stream faster: cpu.empty_weight).
    memory_dtype = {slot.param: _memory_dtype(slot, infos[key], dtype) for key, slot in slots.items() if slot.param}
    for name, p in list(model.named_parameters()):
        module_name, _, attr = name.rpartition(".")
        module = model.get_submodule(module_name)
        memory = (cpu.empty_weight(p.shape, memory_dtype[name]) if device.type == "cpu"
                  else torch.empty(p.shape, dtype=memory_dtype[name], device=device))
        module._parameters[attr] = nn.Parameter(memory, requires_grad=False)
    params = dict(model.named_parameters())

    by_file: dict[Path, list[str]] = {}
    for key, slot in slots.items():
        if slot.param is not None:
            by_file.setdefault(infos[key].file, []).append(key)
    nbytes = {k: slots[k].read_numel() * infos[k].itemsize for keys in by_file.values() for k in keys}
    total = sum(nbytes.values())
    quiet = not progress or (parallel is not None and parallel.rank > 0)   # one bar per job, not per rank
    with tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {path.name}", disable=quiet) as bar:
        for file, keys in by_file.items():
            with safe_open(file, framework="pt", device="cpu") as f:
                for key in keys:
                    slot = slots[key]
                    dest = params[slot.param]
                    t = f.get_tensor(key) if slot.source is None else f.get_slice(key)[slot.source]
                    (dest if slot.index is None else dest[slot.index]).copy_(t)
                    bar.update(nbytes[key])
    model.reset_rope(device)
    return model.eval(), config


# ------------------------------------------------------------------------------------------ writing
def checkpoint_state_dict(model: Transformer) -> dict[str, torch.Tensor]:
    """The model's tensors under checkpoint keys (experts unstacked; weight_shape added for INT4)."""
    slots = checkpoint_layout(model)
    params = dict(model.named_parameters())
    out = {}
    for key, slot in slots.items():
        if slot.kind == "shape":
            out[key] = torch.tensor(_expected_weight_shape(slots, key), dtype=torch.int64)
        else:
            p = params[slot.param].detach()
            out[key] = p if slot.index is None else p[slot.index]
    return out


def _to_checkpoint_format(tensors: dict[str, torch.Tensor], config: ModelConfig) -> dict[str, torch.Tensor]:
    """Check a checkpoint-keyed state dict against the config and quantize the float weights of the
    modules the quantization config covers. Accepts `.weight` or ready `.weight_packed`/`.weight_scale`."""
    with torch.device("meta"):
        model = Transformer(config)
    slots = checkpoint_layout(model)
    given = dict(tensors)
    out: dict[str, torch.Tensor] = {}
    for key, slot in slots.items():
        module = key.rpartition(".")[0]
        if slot.kind == "shape":
            want = _expected_weight_shape(slots, key)
            if key in given and given.pop(key).tolist() != want:
                raise CheckpointError(f"save_checkpoint: tensor {key!r} disagrees with {_packed_key(key)!r}")
            out[key] = torch.tensor(want, dtype=torch.int64)
        elif slot.kind in ("packed", "scale") and key not in given and f"{module}.weight" in given:
            if slot.kind == "packed":
                w = given.pop(f"{module}.weight")
                group = config.quant.group_size
                out[f"{module}.weight_packed"], out[f"{module}.weight_scale"] = int4.quantize(w, group)
        elif key in given:
            out[key] = given.pop(key)
        elif key not in out:
            raise CheckpointError(f"save_checkpoint: tensor {key!r} is missing from the weights given")
    if given:
        raise CheckpointError(f"save_checkpoint: unexpected tensor {next(iter(given))!r} for this config")
    for key, t in out.items():
        if tuple(t.shape) != slots[key].shape:
            raise CheckpointError(f"save_checkpoint: tensor {key!r} has shape {list(t.shape)}, expected {list(slots[key].shape)}")
    return out


class ShardWriter:
    """Writes tensors, in order, into shards model-0000K-of-0000N.safetensors of at most max_shard_bytes
    (a larger tensor gets a shard of its own), then the index with total_size. close() names the
    shards: N is known only then. Holds one shard's tensors at a time."""

    def __init__(self, path: Path, max_shard_bytes: int):
        self.path, self.max_shard_bytes = Path(path), max_shard_bytes
        self.path.mkdir(parents=True, exist_ok=True)
        self.pending: dict[str, torch.Tensor] = {}
        self.pending_bytes = 0
        self.shards: list[tuple[Path, list[str]]] = []    # written under temporary names
        self.total = 0

    def add(self, key: str, t: torch.Tensor) -> None:
        nbytes = t.numel() * t.element_size()
        if self.pending and self.pending_bytes + nbytes > self.max_shard_bytes:
            self._flush()
        self.pending[key] = t.detach().cpu().contiguous()
        self.pending_bytes += nbytes
        self.total += nbytes

    def _flush(self) -> None:
        tmp = self.path / f".shard-{len(self.shards) + 1:05d}.safetensors.tmp"
        save_file(self.pending, tmp, metadata={"format": "pt"})
        self.shards.append((tmp, list(self.pending)))
        self.pending, self.pending_bytes = {}, 0

    def close(self) -> None:
        if self.pending or not self.shards:
            self._flush()
        weight_map = {}
        for i, (tmp, keys) in enumerate(self.shards):
            name = f"model-{i + 1:05d}-of-{len(self.shards):05d}.safetensors"
            tmp.rename(self.path / name)
            weight_map.update(dict.fromkeys(keys, name))
        index = {"metadata": {"total_size": self.total}, "weight_map": weight_map}
        (self.path / INDEX_FILE).write_text(json.dumps(index, indent=2))


def _unstack_experts(tensors: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """A Transformer's own state_dict() -> checkpoint keys: each per-layer expert stack
    (`experts.gate_up_packed` [E, 2I, ...], `experts.down_scale` [E, D, ...], ...) becomes E experts'
    `experts.{e}.{gate,up,down}_proj.*` tensors (gate_up's first half of rows is gate, as the loader
    stacks them). Other keys are already checkpoint keys and pass through."""
    out: dict[str, torch.Tensor] = {}
    for key, t in tensors.items():
        m = _STACKED.match(key)
        if m is None:
            out[key] = t
            continue
        suffix, rows = _FILE_SUFFIX[m["kind"]], t.shape[1]
        parts = ([("gate", slice(0, rows // 2)), ("up", slice(rows // 2, rows))] if m["part"] == "gate_up"
                 else [("down", slice(0, rows))])
        for e in range(t.shape[0]):   # a whole model's stack starts at expert 0
            for proj, sl in parts:
                name = f"{m['prefix']}.{e}.{proj}_proj.{suffix}"
                if name in tensors:
                    raise CheckpointError(f"save_checkpoint: tensor {name!r} is given twice, alone and in {key!r}")
                out[name] = t[e, sl]
    return out


def save_checkpoint(weights: Transformer | dict[str, torch.Tensor], path: str | Path, config: ModelConfig,
                    max_shard_bytes: int = 5 * 2**30, progress: bool = False) -> Path:
    """Write `weights` as a checkpoint directory. `weights` is a Transformer, its `state_dict()`
    (routed experts in per-layer stacks), or a state dict under checkpoint keys (one tensor per expert,
    as `checkpoint_state_dict` and `synthetic.random_state_dict` give).

    Modules that config.quantization_config covers are written as INT4 (quantizing float weights
    where given); everything else as given. Shards of at most `max_shard_bytes` (one tensor larger
    than that gets a shard of its own), an index with total_size, and config.json.
    """
    path = Path(path)
    if not isinstance(weights, (nn.Module, Mapping)):
        raise TypeError(f"save_checkpoint: weights must be a Transformer or a state dict, got {type(weights).__name__}")
    tensors = checkpoint_state_dict(weights) if isinstance(weights, nn.Module) else _unstack_experts(weights)
    writer = ShardWriter(path, max_shard_bytes)
    for key, t in tqdm(_to_checkpoint_format(tensors, config).items(), desc="writing", disable=not progress):
        writer.add(key, t)
    writer.close()
    (path / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    return path


def save_checkpoint_stream(items: Iterable[tuple[str, torch.Tensor]], path: str | Path, config: ModelConfig,
                           max_shard_bytes: int = 5 * 2**30, progress: bool = False) -> Path:
    """save_checkpoint for tensors produced one at a time: (checkpoint key, tensor) pairs, each
    written (quantized first where the config says INT4 and a `.weight` is given) and let go, so
    memory holds one shard, not the model. weight_shape entries are added; a missing, repeated,
    unexpected or misshapen tensor raises CheckpointError."""
    with torch.device("meta"):
        slots = checkpoint_layout(Transformer(config))
    path = Path(path)
    writer = ShardWriter(path, max_shard_bytes)
    written: set[str] = set()

    def add(key: str, t: torch.Tensor) -> None:
        slot = slots.get(key)
        if slot is None:
            raise CheckpointError(f"save_checkpoint_stream: unexpected tensor {key!r} for this config")
        if key in written:
            raise CheckpointError(f"save_checkpoint_stream: tensor {key!r} given twice")
        if tuple(t.shape) != slot.shape:
            raise CheckpointError(f"save_checkpoint_stream: tensor {key!r} has shape {list(t.shape)}, "
                                  f"expected {list(slot.shape)}")
        writer.add(key, t)
        written.add(key)

    for key, t in tqdm(items, desc="writing", disable=not progress):
        module = key.rpartition(".")[0]
        if key.endswith(".weight") and key not in slots and f"{module}.weight_packed" in slots:
            packed, scale = int4.quantize(t, config.quant.group_size)
            add(f"{module}.weight_packed", packed)
            add(f"{module}.weight_scale", scale)
        else:
            add(key, t)
    for key, slot in slots.items():
        if slot.kind == "shape" and key not in written:
            add(key, torch.tensor(_expected_weight_shape(slots, key), dtype=torch.int64))
    missing = [k for k in slots if k not in written]
    if missing:
        raise CheckpointError(f"save_checkpoint_stream: tensor {missing[0]!r} is missing from the weights given "
                              f"({len(missing)} missing)")
    writer.close()
    (path / "config.json").write_text(json.dumps(config.to_dict(), indent=2))
    return path
