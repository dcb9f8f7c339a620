"""Checkpoint loading: time and resident memory for a synthetic INT4 checkpoint written by save_checkpoint.

    python benchmarks/bench_load.py [--dir /tmp/kimi-load-bench] [--device cpu]

Resident memory is read from /proc/self/status (VmRSS now, VmHWM peak) and reported relative to the
bytes on disk; the torch import and interpreter are measured first and subtracted.
"""

from __future__ import annotations

import argparse
import gc
import time
from pathlib import Path

import torch

from kimi_engine import load_model, read_headers
from kimi_engine.synthetic import tiny_config, write_random_checkpoint

# About 0.9 GB on disk: 4 layers (1 dense), 64 INT4 experts per MoE layer, a 32k vocabulary.
MID_CONFIG = dict(vocab_size=32000, hidden_size=2048, intermediate_size=4096, moe_intermediate_size=768,
                  num_hidden_layers=4, num_attention_heads=16, q_lora_rank=512, kv_lora_rank=256,
                  qk_nope_head_dim=128, qk_rope_head_dim=64, v_head_dim=128, n_routed_experts=64,
                  num_experts_per_tok=8, max_position_embeddings=8192)


def rss_mb() -> tuple[float, float]:
    fields = dict(line.split(":", 1) for line in Path("/proc/self/status").read_text().splitlines())
    return tuple(int(fields[k].split()[0]) / 1024 for k in ("VmRSS", "VmHWM"))


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--dir", type=Path, default=Path("/tmp/kimi-load-bench"))
    ap.add_argument("--device", default="cpu")
    args = ap.parse_args()
    if not (args.dir / "config.json").exists():
        write_random_checkpoint(args.dir, tiny_config(**MID_CONFIG), max_shard_bytes=256 * 2**20)
        gc.collect()
    disk_mb = sum(i.nbytes for i in read_headers(args.dir).values()) / 2**20
    Path("/proc/self/clear_refs").write_text("5")  # reset the peak (VmHWM) so writing does not count
    base, _ = rss_mb()
    start = time.perf_counter()
    model, config = load_model(args.dir, device=args.device, progress=False)
    seconds = time.perf_counter() - start
    now, peak = rss_mb()
    in_memory = sum(p.numel() * p.element_size() for p in model.parameters()) / 2**20
    print(f"| checkpoint | {disk_mb:,.0f} MiB on disk, {len(set(i.file for i in read_headers(args.dir).values()))} shards |")
    print("|---|---|")
    print(f"| load time | {seconds:.2f} s ({disk_mb / seconds:,.0f} MiB/s) |")
    print(f"| parameters in memory | {in_memory:,.0f} MiB |")
    print(f"| RSS after load (minus {base:,.0f} MiB before) | {now - base:,.0f} MiB = {(now - base) / disk_mb:.2f}x disk |")
    print(f"| peak RSS during load (minus before) | {peak - base:,.0f} MiB = {(peak - base) / disk_mb:.2f}x disk |")


if __name__ == "__main__":
    main()
