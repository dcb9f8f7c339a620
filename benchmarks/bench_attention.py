"""MLA decode attention (kernels/mla_decode.py) at Kimi K2 dims: time, bytes, GB/s, % of copy bandwidth.

    python benchmarks/bench_attention.py                        # CUDA: 64 heads, 512 + 64 latent, bf16 cache
    python benchmarks/bench_attention.py --interpret --small    # CPU smoke test under TRITON_INTERPRET=1
    python benchmarks/bench_attention.py --splits 32 --config 64,32,8,2   # try a split count / a config

One query token per sequence (decode), every sequence at the given context, one layer's paged cache
(block size 64, blocks shuffled as a long-running cache would leave them), random data. Bytes are the
cache bytes the kernel must read (context x (C + R) x element size per sequence); "61 layers" scales
them and the time to the whole model. "% copy" is achieved GB/s over the device-to-device copy
bandwidth measured in the same run. Baseline: mla_decode_ref, the pure-torch reference (tiled online
softmax, one query at a time), where --ref-max-tokens allows.
"""

from __future__ import annotations

import argparse
import math
import os
import sys

if __name__ == "__main__" and "--interpret" in sys.argv:   # must precede the first triton import
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from common import copy_bandwidth_gbs, device_name, markdown_table, time_ms  # noqa: E402
from kimi_engine.kernels import mla_decode as mla  # noqa: E402

NUM_LAYERS = 61                                      # Kimi K2's layers, each with its own latent cache
BLOCK_SIZE = 64                                      # the cache's default page
FULL = dict(heads=64, latent=512, rope=64, contexts=[1024, 8192, 32768, 131072, 262144], batches=[1, 8])
SMALL = dict(heads=4, latent=32, rope=8, contexts=[64, 1000], batches=[1, 3])


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interpret", action="store_true", help="run the kernels on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--small", action="store_true", help="tiny dims and contexts (for the interpreter)")
    ap.add_argument("--contexts", type=int, nargs="+", help="tokens per sequence (default 1k 8k 32k 128k 256k)")
    ap.add_argument("--batches", type=int, nargs="+", help="sequences (default 1 8)")
    ap.add_argument("--dtype", default="bfloat16", choices=["bfloat16", "float16", "float8_e4m3fn"],
                    help="cache dtype (queries are bf16; fp8 adds per-token scales)")
    ap.add_argument("--splits", type=int, help="force num_splits instead of the heuristic")
    ap.add_argument("--config", help="BLOCK_H,BLOCK_N,num_warps,num_stages for every head count (tuning)")
    ap.add_argument("--ref-max-tokens", type=int, default=8 * 262144, help="skip the reference beyond this many")
    return ap.parse_args(argv)


def paged_cache(batch: int, context: int, width: int, dtype: torch.dtype, device) -> tuple:
    """A shuffled paged cache holding `batch` sequences of `context` tokens: kv, kv_scale, table, lens."""
    per_seq = math.ceil(context / BLOCK_SIZE)
    kv = torch.randn(batch * per_seq, BLOCK_SIZE, width, device=device, dtype=torch.bfloat16).to(dtype)
    scale = None
    if dtype == torch.float8_e4m3fn:
        scale = torch.rand(batch * per_seq, BLOCK_SIZE, 2, device=device) + 0.5
    table = torch.randperm(batch * per_seq, device=device).to(torch.int32).view(batch, per_seq)
    lens = torch.full((batch,), context, dtype=torch.int32, device=device)
    return kv, scale, table, lens


def run(args) -> list[list[object]]:
    device = torch.device("cuda" if torch.cuda.is_available() and not args.interpret else "cpu")
    dims = SMALL if args.small else FULL
    H, C, R = dims["heads"], dims["latent"], dims["rope"]
    dtype = getattr(torch, args.dtype)
    if args.config:
        block_h, block_n, warps, stages = (int(v) for v in args.config.split(","))
        for table in (mla.MLA_DECODE_INTERPRET_CONFIGS, mla.MLA_DECODE_CONFIGS, mla.MLA_DECODE_FP8_CONFIGS,
                      mla.MLA_DECODE_PRE_HOPPER_CONFIGS):
            table[:] = [(math.inf, block_h, block_n, warps, stages)]
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"device: {device_name(device)}; copy bandwidth {copy_gbs:,.0f} GB/s; H={H} C={C} R={R} "
          f"cache {args.dtype}, block size {BLOCK_SIZE}\n")

    rows = []
    for batch in args.batches or dims["batches"]:
        for context in args.contexts or dims["contexts"]:
            kv, kv_scale, table, lens = paged_cache(batch, context, C + R, dtype, device)
            q_latent = torch.randn(batch, H, C, device=device, dtype=torch.bfloat16) / C ** 0.25
            q_rope = torch.randn(batch, H, R, device=device, dtype=torch.bfloat16) / R ** 0.25
            call_args = (q_latent, q_rope, kv, table, lens, 192 ** -0.5)
            block_h = mla.pick_config(H, mla.is_interpreted(mla.mla_decode_kernel), kv_scale is not None,
                                      hopper=mla.capability(device) >= (9, 0))[0]
            splits = args.splits or mla.choose_num_splits(context, batch, math.ceil(H / block_h), device)
            ms = time_ms(lambda: mla.mla_decode(*call_args, kv_scale=kv_scale, num_splits=splits), device)
            ref_ms = math.nan
            if batch * context <= args.ref_max_tokens:
                ref_ms = time_ms(lambda: mla.mla_decode_ref(*call_args, kv_scale=kv_scale), device)
            nbytes = batch * context * (C + R) * kv.element_size()
            if kv_scale is not None:
                nbytes += batch * context * 2 * kv_scale.element_size()
            gbs = nbytes / (ms * 1e-3) / 1e9
            rows.append([f"{context:,}", batch, splits, f"{ms * 1e3:,.1f}", f"{nbytes / 1e6:,.2f}",
                         f"{gbs:,.0f}", f"{100 * gbs / copy_gbs:.0f}%", f"{NUM_LAYERS * nbytes / 1e9:,.1f}",
                         f"{NUM_LAYERS * ms:,.2f}", f"{ref_ms * 1e3:,.0f}", f"{ref_ms / ms:,.1f}x"])
            del kv, kv_scale, table
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    rows = run(args)
    header = ["context", "batch", "splits", "kernel us", "layer MB", "GB/s", "% copy", "61 layers GB",
              "61 layers ms", "ref us", "speedup"]
    print(markdown_table(header, rows))


if __name__ == "__main__":
    main()
