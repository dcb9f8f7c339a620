"""bench_e2e.py's parts: a full-width random checkpoint, decode at a fixed context, the bytes a step must
read, where a step's time goes (profile), the HF peer, the plot.

Import from a script in this directory (`from e2e_parts import ...`), like common.py.
"""

from __future__ import annotations

import math
import statistics
import time
from contextlib import contextmanager

import torch
from torch import nn

from common import sync

from kimi_engine import int4
from kimi_engine.checkpoint import checkpoint_layout, save_checkpoint
from kimi_engine.config import ModelConfig
from kimi_engine.model import MoE, Transformer

CODE_STD = 4.61   # std of a uniform INT4 code in -8..7 (random packed words): sqrt((16^2 - 1) / 12)


# ------------------------------------------------------------------------------------------ checkpoint
def random_checkpoint(path, config: ModelConfig, seed: int, device: torch.device):
    """Write a checkpoint of random weights in the published layout, INT4 experts generated directly as
    packed codes + scales: quantizing float experts would need 135 GB of bf16 per 4 MoE layers at
    Kimi's widths. Random on `device` (fast on a GPU), then written with save_checkpoint. Scales and
    projections give every weight a std of 1/sqrt(fan_in), so activations stay O(1); nothing is zero."""
    with torch.device("meta"):
        model = Transformer(config)
    g = torch.Generator(device).manual_seed(seed)
    group = config.quant.group_size if config.quant else 1
    tensors = {}
    for key, slot in checkpoint_layout(model).items():
        shape = slot.shape
        if slot.kind == "shape":
            continue                                          # save_checkpoint writes weight_shape
        if slot.kind == "packed":
            t = torch.randint(-2**31, 2**31 - 1, shape, dtype=torch.int32, generator=g, device=device)
        elif slot.kind == "scale":
            fan_in = shape[-1] * group
            t = (1 + 0.1 * torch.randn(shape, generator=g, device=device)) / (CODE_STD * math.sqrt(fan_in))
        elif slot.kind == "bias":
            t = 0.1 * torch.randn(shape, generator=g, device=device)
        elif key.endswith("norm.weight"):
            t = 1 + 0.1 * torch.randn(shape, generator=g, device=device)
        elif key.endswith("embed_tokens.weight"):
            t = torch.randn(shape, generator=g, device=device)
        else:
            t = torch.randn(shape, generator=g, device=device) * shape[-1] ** -0.5
        dtype = torch.int32 if slot.kind == "packed" else torch.float32 if slot.kind == "bias" else torch.bfloat16
        tensors[key] = t.to(dtype).cpu()
    return save_checkpoint(tensors, path, config)


# ------------------------------------------------------------------------------------------ timing
def timed_ms(fn, device: torch.device, reps: int) -> float:
    """Median wall time of fn() over `reps` runs (for calls too long for do_bench's many repeats)."""
    times = []
    for _ in range(reps):
        sync(device)
        start = time.perf_counter()
        fn()
        sync(device)
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def decode_cache(engine, batch: int, context: int):
    """A cache whose `batch` sequences hold context - 1 random latents each: the next step decodes position
    context - 1. Random values stand in for a prefill (they do not change what a step reads)."""
    cache = engine.new_cache()
    cache.reserve(-(-batch * context // cache.block_size) + batch + 2)   # never grows afterwards: no re-capture
    seqs = [cache.add_sequence() for _ in range(batch)]
    cache.prepare(seqs, context - 1, device="cpu")
    for pool in cache.pools.kv:
        pool.normal_()
    return cache, seqs


def graph_decoder(engine, cache):
    """DecodeGraphs over `cache`'s pools (a scratch sequence taken from it), as a step(cache, seqs, tokens)."""
    from kimi_engine.runtime.cuda_graphs import DecodeGraphs
    scratch = cache.add_sequence()
    b = cache.prepare([scratch], 1, device="cpu")
    graphs = DecodeGraphs(engine.model, cache.pools, engine.max_batch_size, engine.max_seq_len,
                          (int(b.block_table[0, 0]), int(b.slots[0, 0])))
    graphs.step = lambda cache, seqs, tokens: graphs.decode(cache.prepare(seqs, 1, device="cpu"), tokens)
    return graphs


def rewound(step, cache, seqs, context, tokens):
    """step(cache, seqs, tokens), the sequences first rewound to context - 1 tokens: every call decodes the
    same position again (same blocks, same slots), so the context stays fixed however often it runs."""
    def run():
        for s in seqs:
            cache.lengths[s] = context - 1
        return step(cache, seqs, tokens)
    return run


def profile_step(fn, device: torch.device, steps: int = 5, top: int = 10) -> str:
    """Where fn()'s time goes: the top kernels (ops, on a CPU) by self time per call, and the share of the
    wall time they fill; on a GPU the rest is launch gaps and host work (the profiler adds some of its own)."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile
    cuda = device.type == "cuda"
    fn()
    sync(device)
    with profile(activities=[ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])) as prof:
        start = time.perf_counter()
        for _ in range(steps):
            fn()
        sync(device)
        wall = (time.perf_counter() - start) * 1e3 / steps
    kind = DeviceType.CUDA if cuda else DeviceType.CPU
    events = [e for e in prof.key_averages() if e.device_type == kind]

    def ms(e):   # self time per call of fn, ms
        return (e.self_device_time_total if cuda else e.self_cpu_time_total) / 1e3 / steps
    busy = sum(ms(e) for e in events)
    lines = [f"{wall:.3f} ms per call under the profiler; {'kernels' if cuda else 'ops'} {busy:.3f} ms "
             f"({busy / wall:.0%} busy)"]
    for e in sorted(events, key=ms, reverse=True)[:top]:
        lines.append(f"  {ms(e):8.3f} ms {ms(e) / busy:5.1%}  x{e.count // steps:<4d} {e.key[:90]}")
    return "\n".join(lines)


def save_plot(rows, path: str, title: str) -> bool:
    """Decode ms per step against batch, eager and CUDA graphs beside the byte floor; False without matplotlib."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(7, 4.5))
    for i, ctx in enumerate(sorted({r["context"] for r in rows})):
        sel = [r for r in rows if r["context"] == ctx]
        x, color = [r["batch"] for r in sel], f"C{i}"
        ax.plot(x, [r["eager"] for r in sel], "o--", color=color, alpha=0.6, label=f"eager, context {ctx:,}")
        ax.plot(x, [r["graphs"] for r in sel], "o-", color=color, label=f"CUDA graphs, context {ctx:,}")
        ax.plot(x, [r["floor"] for r in sel], ":", color=color, label=f"byte floor, context {ctx:,}")
    batches = sorted({r["batch"] for r in rows})
    ax.set(xscale="log", yscale="log", xlabel="batch (sequences)", ylabel="ms per decode step", title=title)
    ax.set_xticks(batches, [str(b) for b in batches])
    ax.minorticks_off()
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True


# ------------------------------------------------------------------------------------------ bytes
def nbytes(params) -> int:
    return sum(p.numel() * p.element_size() for p in params)


def distinct_experts(n_experts: int, top_k: int, batch: int) -> float:
    """Expected distinct experts that `batch` tokens route to, each picking top_k of n uniformly."""
    return n_experts * (1 - (1 - top_k / n_experts) ** batch)


def layer_floor_bytes(block: nn.Module, batch: int, context: int, kv_bytes_per_token: float) -> float:
    """Bytes one decode step must read in this layer: every weight but the routed experts (attention with
    kv_b whole, norms, the dense MLP or router + shared expert), the distinct experts the batch touches,
    and the batch's cached latents at `context` tokens."""
    fixed = nbytes(p for n, p in block.named_parameters() if not n.startswith("mlp.experts."))
    routed = 0.0
    if isinstance(block.mlp, MoE):
        experts = block.mlp.experts
        routed = distinct_experts(experts.n_experts, block.mlp.gate.top_k, batch) * nbytes(experts.parameters()) \
            / experts.n_experts
    return fixed + routed + batch * context * kv_bytes_per_token


def head_floor_bytes(model: Transformer, batch: int) -> float:
    """Bytes outside the layers: `batch` embedding rows, the final norm, the whole lm_head."""
    emb = model.model.embed_tokens.weight
    head = emb if model.lm_head is None else model.lm_head.weight
    return batch * emb.shape[1] * emb.element_size() + nbytes(model.model.norm.parameters()) + nbytes([head])


@contextmanager
def first_layers(model: Transformer, n: int):
    """Run only the model's first n layers inside the block (for the peer comparison)."""
    layers = model.model.layers
    model.model.layers = layers[:n]
    try:
        yield
    finally:
        model.model.layers = layers


# ------------------------------------------------------------------------------------------ HF peer
def hf_bytes(model: Transformer, n_layers: int, dtype: torch.dtype) -> int:
    """Bytes HF's model of the first n_layers takes in `dtype`: every weight dense (INT4 dequantized)."""
    size = torch.empty(0, dtype=dtype).element_size()
    total = 0
    for name, p in model.named_parameters():
        parts = name.split(".")
        if name.startswith("model.layers.") and int(parts[2]) >= n_layers or name.endswith("scale"):
            continue
        total += p.numel() * (int4.PACK_FACTOR if name.endswith("packed") else 1) * size
    return total


def hf_peer(model: Transformer, n_layers: int, device: torch.device, dtype: torch.dtype):
    """HF transformers' DeepseekV3ForCausalLM with the first n_layers of `model`'s weights (experts
    dequantized expert by expert on `device`, so no float copy of a whole stack exists at once)."""
    import transformers
    d = {k: v for k, v in model.config.to_dict().items()
         if k not in ("quantization_config", "architectures", "model_type", "torch_dtype")}
    config = transformers.DeepseekV3Config(**{**d, "num_hidden_layers": n_layers}, attn_implementation="eager")
    with torch.device("meta"):
        hf = transformers.DeepseekV3ForCausalLM(config)
    state = {}
    for name, p in model.named_parameters():
        parts = name.split(".")
        if name.startswith("model.layers.") and int(parts[2]) >= n_layers or name.endswith("scale"):
            continue
        if name.endswith("packed"):   # Linear: .weight_packed -> .weight; experts: .gate_up_packed -> .gate_up_proj
            scale = model.get_parameter(name.removesuffix("packed") + "scale")
            w = torch.empty(*p.shape[:-1], p.shape[-1] * int4.PACK_FACTOR, dtype=dtype, device=device)
            step = 1 if p.dim() == 3 else p.shape[0]             # one expert at a time
            for i in range(0, p.shape[0], step):
                w[i:i + step] = int4.dequantize(p[i:i + step].to(device), scale[i:i + step].to(device), dtype)
            stem = name.removesuffix("_packed")
            state[stem if stem.endswith("weight") else stem + "_proj"] = w
        else:
            t = p.detach().to(device)
            state[name] = t if name.endswith("e_score_correction_bias") else t.to(dtype)
    missing, unexpected = hf.load_state_dict(state, strict=False, assign=True)
    assert not unexpected and all("rotary" in k for k in missing), (missing, unexpected)
    hf.model.rotary_emb = type(hf.model.rotary_emb)(config).to(device)    # built on meta: rebuild
    return hf.eval()


@torch.inference_mode()
def hf_decode_ms(hf, context: int, vocab: int, device: torch.device, steps: int, sync) -> float:
    """HF's batch-1 decode: prefill `context` random tokens, then ms per single-token forward (KV cache)."""
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(2, vocab, (1, context), generator=g).to(device)
    past = hf(ids, use_cache=True).past_key_values
    token = ids[:, -1:]
    for _ in range(2):                                # warm-up
        past = hf(token, past_key_values=past, use_cache=True).past_key_values
    sync(device)
    start = time.perf_counter()
    for _ in range(steps):
        past = hf(token, past_key_values=past, use_cache=True).past_key_values
    sync(device)
    return (time.perf_counter() - start) * 1e3 / steps
