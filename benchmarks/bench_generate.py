"""Prefill and decode tokens/s of kimi-engine against HF transformers' generate, same weights, greedy.

    python benchmarks/bench_generate.py [--layers 4] [--prompt 256] [--new 64] [--device cpu]

A small random Kimi-architecture checkpoint (INT4 experts, written by save_checkpoint) is loaded by
both: ours as published, HF's DeepseekV3ForCausalLM with the experts dequantized. Both run float32
on CPU (bfloat16 on CUDA), eager. Decode tokens/s excludes the prefill (the first token's time).
"""

from __future__ import annotations

import argparse
import sys
import tempfile
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import kimi_engine as ke  # noqa: E402
from kimi_engine.synthetic import tiny_config, write_random_checkpoint  # noqa: E402
from tests.hf_reference import hf_model_from_checkpoint  # noqa: E402

# About 60M parameters: wide enough that the math, not Python, is most of a decode step.
SMALL = dict(vocab_size=8192, hidden_size=512, intermediate_size=1536, moe_intermediate_size=256,
             num_attention_heads=8, q_lora_rank=192, kv_lora_rank=128, qk_nope_head_dim=64, qk_rope_head_dim=32,
             v_head_dim=64, n_routed_experts=16, num_experts_per_tok=4, max_position_embeddings=4096)


def sync(device):
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_ours(engine, prompt, new):
    """(prefill seconds, decode seconds for new - 1 tokens), from the streaming API's first token."""
    sync(engine.device)
    start = time.perf_counter()
    first = None
    for delta in engine.generate(prompt, max_new_tokens=new, temperature=0, stop_token_ids=[], stream=True):
        if first is None:
            sync(engine.device)
            first = time.perf_counter()
    sync(engine.device)
    return first - start, time.perf_counter() - first


@torch.no_grad()
def time_hf(model, prompt, new, device):
    ids = torch.tensor([prompt], device=device)
    sync(device)
    start = time.perf_counter()
    model.generate(ids, max_new_tokens=1, min_new_tokens=1, do_sample=False, pad_token_id=0)
    sync(device)
    prefill = time.perf_counter() - start
    start = time.perf_counter()
    out = model.generate(ids, max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    sync(device)
    assert out.shape[1] == len(prompt) + new
    return prefill, time.perf_counter() - start - prefill


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=4)
    ap.add_argument("--prompt", type=int, default=256)
    ap.add_argument("--new", type=int, default=64)
    ap.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    ap.add_argument("--tiny", action="store_true", help="the test suite's tiny config (a smoke run)")
    args = ap.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    config = tiny_config(**({} if args.tiny else SMALL), num_hidden_layers=args.layers)
    with tempfile.TemporaryDirectory() as tmp:
        path = write_random_checkpoint(Path(tmp), config)
        engine = ke.load(path, device=device, dtype=dtype, progress=False)
        hf = hf_model_from_checkpoint(path, config, dtype).to(device)
    prompt = torch.randint(2, config.vocab_size, (args.prompt,), generator=torch.Generator().manual_seed(0)).tolist()
    time_ours(engine, prompt[:8], 4)                       # warm-up
    time_hf(hf, prompt[:8], 4, device)
    ours, theirs = time_ours(engine, prompt, args.new), time_hf(hf, prompt, args.new, device)
    same = engine.generate(prompt, max_new_tokens=16, temperature=0, stop_token_ids=[]).token_ids == hf.generate(
        torch.tensor([prompt], device=device), max_new_tokens=16, min_new_tokens=16, do_sample=False,
        pad_token_id=0)[0, len(prompt):].tolist()
    params = sum(p.numel() * (8 if p.dtype == torch.int32 else 1) for p in engine.model.parameters())
    threads = torch.get_num_threads()
    print(f"device: {device} ({threads} threads), {dtype}, {args.layers} layers, ~{params / 1e6:.0f}M parameters, "
          f"prompt {args.prompt}, {args.new} new tokens, greedy; same first 16 tokens as HF: {same}")
    print("| engine | prefill tok/s | decode tok/s |")
    print("|---|---:|---:|")
    rows = {"kimi-engine": ours, "HF transformers": theirs}
    for name, (prefill, decode) in rows.items():
        print(f"| {name} | {args.prompt / prefill:,.1f} | {(args.new - 1) / decode:,.1f} |")
    print(f"| ratio (ours / HF) | {theirs[0] / ours[0]:.2f}x | {theirs[1] / ours[1]:.2f}x |")


if __name__ == "__main__":
    main()
