"""HF transformers' DeepseekV3ForCausalLM holding a checkpoint of ours, for bench_cpu.py: built empty in
the run dtype and filled tensor by tensor (INT4 experts dequantized one at a time into HF's stacked
gate_up_proj [E, 2I, D] / down_proj [E, D, I]), so memory is the model once."""

from __future__ import annotations

import torch
from safetensors import safe_open

from kimi_engine import int4
from kimi_engine.checkpoint import read_headers
from kimi_engine.config import ModelConfig


def hf_model(path, config: ModelConfig, dtype: torch.dtype):
    import transformers
    d = {k: v for k, v in config.to_dict().items()
         if k not in ("quantization_config", "architectures", "model_type", "torch_dtype")}
    d["pad_token_id"] = None   # Kimi's pad id lies past a smaller vocabulary; nothing is padded here
    hf_config = transformers.DeepseekV3Config(**d, attn_implementation="sdpa")
    torch.set_default_dtype(dtype)
    try:
        model = transformers.DeepseekV3ForCausalLM(hf_config).eval()
    finally:
        torch.set_default_dtype(torch.float32)
    params, buffers = dict(model.named_parameters()), dict(model.named_buffers())   # the router bias is a buffer
    infos = read_headers(path)
    handles = {info.file: safe_open(info.file, "pt") for info in infos.values()}
    loaded = set()
    for key, info in infos.items():
        f = handles[info.file]
        if key.endswith(("weight_scale", "weight_shape")):
            continue
        if key.endswith("weight_packed"):
            module = key.removesuffix(".weight_packed")
            w = int4.dequantize(f.get_tensor(key), f.get_tensor(module + ".weight_scale"), dtype)
            prefix, _, rest = module.partition(".experts.")
            e, proj = rest.split(".")
            e, I = int(e), config.moe_intermediate_size
            if proj == "down_proj":
                name, rows = f"{prefix}.experts.down_proj", slice(None)
            else:
                name, rows = f"{prefix}.experts.gate_up_proj", slice(0, I) if proj == "gate_proj" else slice(I, 2 * I)
            params[name].data[e, rows].copy_(w)
            loaded.add(name)
        else:
            (params[key] if key in params else buffers[key]).data.copy_(f.get_tensor(key))
            loaded.add(key)
    missing = set(params) - loaded
    if missing:
        raise RuntimeError(f"HF model: no checkpoint tensor for {sorted(missing)[:3]}")
    for module in model.modules():   # HF keeps the router bias in float32
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()
    return model
