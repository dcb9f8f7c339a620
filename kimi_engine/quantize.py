"""Quantize a bf16 checkpoint of this architecture into Kimi K2 Thinking's published INT4 layout.

    kimi-engine quantize SRC DST [--group-size 32] [--device cuda]

Routed experts become compressed-tensors "pack-quantized" INT4 (symmetric round-to-nearest, one
bf16 scale per group of inputs; int4.quantize), with Kimi K2 Thinking's own quantization_config;
every other tensor is copied unchanged. The source is validated first and streamed shard by shard,
so memory holds one source tensor and one output shard. The output goes to DST.partial and is
renamed to DST once complete and validated: DST never exists half-written. The other files of the
directory (tokenizer, chat template, generation config) are copied.
"""

from __future__ import annotations

import dataclasses
import json
import shutil
from pathlib import Path

import torch
from safetensors import safe_open
from tqdm.auto import tqdm

from . import int4
from .checkpoint import (INDEX_FILE, SINGLE_FILE, ShardWriter, _is_mtp_key, _shard_files, check_checkpoint,
                         checkpoint_layout)
from .config import KIMI_QUANT, ModelConfig
from .errors import CheckpointError
from .model import Transformer


def quantize_checkpoint(src: str | Path, dst: str | Path, group_size: int = KIMI_QUANT.group_size,
                        device: torch.device | str = "cpu", max_shard_bytes: int = 5 * 2**30,
                        progress: bool = True) -> Path:
    """Write the INT4 version of the bf16 checkpoint `src` to `dst` (a new directory) and return dst."""
    src, dst = Path(src), Path(dst)
    try:
        device = torch.device(device)
    except RuntimeError as e:
        raise ValueError(f"device={device!r}: {e}") from None
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ValueError(f"device={device}: CUDA is not available here")
    config = ModelConfig.from_json(src)
    if config.quant is not None:
        raise CheckpointError(f"{src / 'config.json'}: already quantized (quantization_config is set)")
    if dst.exists():
        raise CheckpointError(f"{dst}: already exists; quantize writes a new directory")
    check_checkpoint(src)                        # every tensor present and well-formed before writing anything
    target = ModelConfig.from_dict({**config.to_dict(), "quantization_config":
                                    dataclasses.replace(KIMI_QUANT, group_size=group_size).to_dict()})
    try:
        with torch.device("meta"):
            slots = checkpoint_layout(Transformer(target))
    except ValueError as e:                      # an INT4 module's inputs do not split into whole groups
        raise CheckpointError(f"{src}: cannot quantize with group_size={group_size}: {e}") from None

    def quantized(key: str) -> bool:
        """Whether `key` is the float weight of a module the target quantizes. Multi-token-prediction
        layers are not in the model (the engine does not run them), but their experts follow the rule."""
        module = key.removesuffix(".weight")
        if f"{module}.weight_packed" in slots:
            return True
        return _is_mtp_key(key, config) and ".mlp.experts." in key and target.quant.is_quantized(module)

    files, _ = _shard_files(src)
    partial = dst.with_name(dst.name + ".partial")
    if partial.exists():                         # left by a run that died
        shutil.rmtree(partial)
    try:
        writer = ShardWriter(partial, max_shard_bytes)
        total = sum(f.stat().st_size for f in files)
        with tqdm(total=total, unit="B", unit_scale=True, desc="quantizing", disable=not progress) as bar:
            for file in files:
                with safe_open(file, "pt") as f:
                    for key in f.keys():
                        if key.endswith(".weight") and quantized(key):
                            module, w = key.removesuffix(".weight"), f.get_tensor(key)
                            packed, scale = int4.quantize(w.to(device), group_size)
                            writer.add(f"{module}.weight_packed", packed)
                            writer.add(f"{module}.weight_scale", scale)
                            writer.add(f"{module}.weight_shape", torch.tensor(list(w.shape), dtype=torch.int64))
                        else:
                            writer.add(key, f.get_tensor(key))
                bar.update(file.stat().st_size)
        writer.close()
        for extra in src.iterdir():              # tokenizer, chat template, generation config, ...
            if extra.is_file() and extra.name not in (INDEX_FILE, SINGLE_FILE, "config.json") and extra not in files:
                shutil.copy2(extra, partial / extra.name)
        (partial / "config.json").write_text(json.dumps(target.to_dict(), indent=2))
        check_checkpoint(partial)
    except BaseException:
        shutil.rmtree(partial, ignore_errors=True)
        raise
    partial.rename(dst)
    return dst
