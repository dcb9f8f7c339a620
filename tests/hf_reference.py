"""HF transformers' DeepseekV3ForCausalLM with the same weights as a checkpoint of ours (test-only reference)."""

import pytest
import torch

from kimi_engine import int4
from kimi_engine.checkpoint import INDEX_FILE, read_headers

transformers = pytest.importorskip("transformers")


def hf_config(config):
    d = {k: v for k, v in config.to_dict().items()
         if k not in ("quantization_config", "architectures", "model_type", "torch_dtype")}
    return transformers.DeepseekV3Config(**d, attn_implementation="eager")


def checkpoint_tensors(path) -> dict[str, torch.Tensor]:
    from safetensors import safe_open
    out = {}
    for key, info in read_headers(path).items():
        with safe_open(info.file, "pt") as f:
            out[key] = f.get_tensor(key)
    return out


def hf_model_from_checkpoint(path, config, dtype=torch.float32):
    """An HF model whose weights are our checkpoint's, INT4 experts dequantized (in float32, then cast)."""
    ckpt = checkpoint_tensors(path)
    dense = {}
    for key, t in ckpt.items():
        if key.endswith("weight_packed"):
            module = key.removesuffix(".weight_packed")
            dense[module + ".weight"] = int4.dequantize(t, ckpt[module + ".weight_scale"])
        elif not key.endswith(("weight_scale", "weight_shape")):
            dense[key] = t.float()
    hf_sd = {}
    for key, t in dense.items():
        prefix, sep, rest = key.partition(".experts.")
        if not sep:
            hf_sd[key] = t
            continue
        e, proj, _ = rest.split(".")
        if proj == "gate_proj":  # HF stacks experts: gate_up_proj [E, 2I, D], down_proj [E, D, I]
            hf_sd.setdefault(f"{prefix}.experts.gate_up_proj", {})[int(e)] = torch.cat(
                [t, dense[f"{prefix}.experts.{e}.up_proj.weight"]])
        elif proj == "down_proj":
            hf_sd.setdefault(f"{prefix}.experts.down_proj", {})[int(e)] = t
    for key, v in hf_sd.items():
        if isinstance(v, dict):
            hf_sd[key] = torch.stack([v[e] for e in sorted(v)])
    model = transformers.DeepseekV3ForCausalLM(hf_config(config)).eval()
    missing, unexpected = model.load_state_dict(hf_sd, strict=False)
    tied = {"lm_head.weight"} if config.tie_word_embeddings else set()
    assert not unexpected and all("rotary" in k or k in tied for k in missing), (missing, unexpected)
    model.tie_weights()
    model.to(dtype)
    for module in model.modules():  # HF keeps the router bias in float32 (_keep_in_fp32_modules_strict)
        if hasattr(module, "e_score_correction_bias"):
            module.e_score_correction_bias.data = module.e_score_correction_bias.data.float()
    return model


@torch.no_grad()
def hf_logits(model, token_ids) -> torch.Tensor:
    return model(torch.tensor([token_ids])).logits[0].float()
