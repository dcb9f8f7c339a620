"""Sweep the INT4 kernels' launch configs at Kimi K2 widths and print the fastest per size.

    python benchmarks/tune_int4.py                  # CUDA: time every candidate, check each against the reference
    python benchmarks/tune_int4.py --compile-only   # no GPU: compile each for sm_90, print registers and spills
    python benchmarks/tune_int4.py --then-e2e       # CUDA: then run bench_e2e with the winners installed

A candidate is a row of MOE_CONFIGS / W4A16_CONFIGS (blocks, warps, stages); the shipped row is
timed first. Random data; every candidate's output is compared with the reference, and one off by
more than bf16 rounding allows is reported, never chosen. Paste the winners into the tables.
"""

from __future__ import annotations

import argparse
import math
import sys
import time

import torch

from common import copy_bandwidth_gbs, device_name, markdown_table, time_ms
from kimi_engine.kernels import aot, moe, w4a16
from bench_kernels import random_int4, rel_err

D, I, E, TOP_K = 7168, 2048, 384, 8
SHIPPED_MOE, SHIPPED_W4A16 = list(moe.MOE_CONFIGS), list(w4a16.W4A16_CONFIGS)   # before any sweep installs one
START = time.perf_counter()
GEMV = [(1, bn, bk, w, s) for bn, bk, w, s in
        [(8, 512, 4, 3), (16, 256, 4, 3), (16, 512, 4, 3), (16, 512, 8, 3), (32, 256, 4, 3), (32, 512, 8, 3),
         (16, 1024, 8, 3), (16, 512, 4, 1)]]
MOE_DOT = {64: [(16, 64, 128, 4, 4), (16, 128, 128, 4, 3), (16, 64, 256, 4, 3), (16, 128, 64, 4, 4)],
           512: [(32, 64, 128, 4, 4), (32, 128, 128, 8, 3), (16, 128, 128, 4, 3), (64, 128, 64, 8, 3)],
           4096: [(64, 128, 64, 8, 3), (64, 128, 128, 8, 3), (128, 128, 64, 8, 3), (64, 256, 64, 8, 3),
                  (128, 128, 128, 8, 3)]}
LINEAR = {1: [(1, bn, bk, 1, w, s) for _, bn, bk, w, s in GEMV],
          16: [(16, 64, 128, 1, 4, 4), (16, 32, 256, 1, 4, 3), (16, 64, 256, 1, 4, 3), (16, 128, 128, 1, 4, 3)],
          4096: [(128, 128, 64, 8, 8, 3), (128, 128, 128, 8, 8, 3), (128, 256, 64, 8, 8, 3), (64, 128, 64, 8, 4, 4),
                 (128, 128, 64, 8, 4, 4)]}


def moe_candidates(t: int):
    """The shipped row for t tokens first, then the sweep."""
    shipped = next(c for c in SHIPPED_MOE if t * TOP_K <= c[0] * E)[1:]
    return [shipped] + [c for c in (GEMV if t * TOP_K <= E else MOE_DOT[t]) if c != shipped]


def linear_candidates(m: int):
    shipped = next(c for c in SHIPPED_W4A16 if m <= c[0])[1:]
    return [shipped] + [c for c in LINEAR[m] if c != shipped]


def moe_case(t, device):
    gate_up, down = random_int4(E, 2 * I, D, device=device), random_int4(E, D, I, device=device)
    x = torch.randn(t, D, device=device).to(torch.bfloat16)
    ids = torch.rand(t, E, device=device).topk(TOP_K, dim=1).indices.to(torch.int32)
    weights = torch.rand(t, TOP_K, device=device) + 0.1
    args = (x, *gate_up, *down, weights, ids)
    touched = ids.unique().numel()
    nbytes = touched * sum(a.numel() * a.element_size() for a in (*gate_up, *down)) / E
    return nbytes, lambda: moe.fused_moe(*args), lambda: moe.fused_moe_ref(*args)


def linear_case(m, n, k, device):
    packed, scale = random_int4(n, k, device=device)
    x = torch.randn(m, k, device=device).to(torch.bfloat16)
    nbytes = packed.numel() * 4 + scale.numel() * 2
    return nbytes, lambda: w4a16.w4a16_matmul(x, packed, scale), lambda: w4a16.w4a16_matmul_ref(x, packed, scale)


def sweep(name, size, candidates, install, fn, ref_fn, nbytes, device, copy_gbs, compile_only, report, budget):
    """Time (or compile) each candidate; returns [(ms, cfg, shipped?)] of the correct ones, fastest first.
    Past `budget` seconds since the start only the shipped row is timed."""
    ref = None if compile_only else ref_fn()
    results = []
    for i, cfg in enumerate(candidates):
        if i and time.perf_counter() - START > budget:
            report.append([name, size, str(cfg), "-", "-", "skipped: over --budget"])
            continue
        install(cfg)
        start = time.perf_counter()
        try:
            if compile_only:
                with aot.compile_only(90) as compiled:
                    fn()
                notes = "; ".join(f"{k.metadata.name} regs {v.registers} spill {v.spilled} loop {v.loop_spills} "
                                  f"smem {v.shared // 1024}K {v.tensor_cores}"
                                  for k, c in compiled for v in [aot.describe(name, k, c)])
                report.append([name, size, str(cfg), "-", "-", notes])
                continue
            err = rel_err(fn(), ref)
            ms = time_ms(fn, device)
        except Exception as e:   # a config the compiler rejects (shared memory, registers): report, go on
            report.append([name, size, str(cfg), "-", "-", f"{type(e).__name__}: {str(e).splitlines()[0][:120]}"])
            continue
        gbs = nbytes / ms / 1e6
        ok = err < 2e-2
        report.append([name, size, str(cfg), f"{ms * 1e3:,.1f}", f"{100 * gbs / copy_gbs:.0f}%",
                       ("shipped; " if i == 0 else "") + f"err {err:.1e}" + ("" if ok else " WRONG")
                       + f"; {time.perf_counter() - start:.1f} s"])
        print(" | ".join(report[-1]), flush=True)
        if ok:
            results.append((ms, cfg, i == 0))
    return sorted(results)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--compile-only", action="store_true")
    ap.add_argument("--ops", nargs="+", default=["moe", "w4a16"], choices=["moe", "w4a16"])
    ap.add_argument("--then-e2e", action="store_true", help="run bench_e2e (3 layers) with the winners installed")
    ap.add_argument("--budget", type=float, default=math.inf, help="seconds: past it, sweeps time only the shipped row")
    args = ap.parse_args(argv)
    device = torch.device("cpu" if args.compile_only else "cuda")
    copy_gbs = 1.0 if args.compile_only else copy_bandwidth_gbs(device)
    report, best = [], {}
    torch.manual_seed(0)
    defaults = (list(moe.MOE_CONFIGS), list(w4a16.W4A16_CONFIGS))

    if "moe" in args.ops:
        for t in (1, 8, 4096, 64, 512):
            if args.compile_only:   # compiling needs the shapes only: 8 experts are enough
                few = 8
                gu = (torch.zeros(few, 2 * I, D // 8, dtype=torch.int32), torch.ones(few, 2 * I, D // 32, dtype=torch.bfloat16))
                dn = (torch.zeros(few, D, I // 8, dtype=torch.int32), torch.ones(few, D, I // 32, dtype=torch.bfloat16))
                ids = (torch.arange(t * TOP_K) % few).view(t, TOP_K).int()
                xs = torch.zeros(t, D, dtype=torch.bfloat16)
                nbytes, fn, ref_fn = 0, (lambda xs=xs, gu=gu, dn=dn, ids=ids, t=t:
                                         moe.fused_moe(xs, *gu, *dn, torch.ones(t, TOP_K), ids)), None
            else:
                nbytes, fn, ref_fn = moe_case(t, device)
            pairs_per_expert = math.ceil(t * TOP_K / E)
            install = lambda cfg: setattr(moe, "MOE_CONFIGS", [(math.inf, *cfg)])  # noqa: E731
            found = sweep("moe", f"T={t}", moe_candidates(t), install, fn, ref_fn, nbytes, device, copy_gbs,
                          args.compile_only, report, args.budget)
            if found:
                shipped = next((ms for ms, _, first in found if first), math.nan)
                best[("moe", t)] = (found[0][0], found[0][1], pairs_per_expert, nbytes, shipped)
            fn = ref_fn = None
            if device.type == "cuda":
                torch.cuda.empty_cache()
        moe.MOE_CONFIGS = defaults[0]

    if "w4a16" in args.ops:
        for m, (n, k) in [(1, (18432, 7168)), (1, (7168, 2048)), (16, (18432, 7168)), (4096, (18432, 7168))]:
            if args.compile_only:
                x0 = torch.zeros(m, k, dtype=torch.bfloat16)
                p0, s0 = torch.zeros(n, k // 8, dtype=torch.int32), torch.ones(n, k // 32, dtype=torch.bfloat16)
                nbytes, fn, ref_fn = 0, (lambda x0=x0, p0=p0, s0=s0: w4a16.w4a16_matmul(x0, p0, s0)), None
            else:
                nbytes, fn, ref_fn = linear_case(m, n, k, device)
            install = lambda cfg: setattr(w4a16, "W4A16_CONFIGS", [(math.inf, *cfg)])  # noqa: E731
            found = sweep("w4a16", f"M={m} {n}x{k}", linear_candidates(m), install, fn, ref_fn, nbytes, device,
                          copy_gbs, args.compile_only, report, args.budget)
            if found:
                shipped = next((ms for ms, _, first in found if first), math.nan)
                best[("w4a16", m, n)] = (found[0][0], found[0][1], m, nbytes, shipped)
        w4a16.W4A16_CONFIGS = defaults[1]

    print(f"\n## tune_int4: {device_name(device)}, bf16, copy bandwidth {copy_gbs:,.0f} GB/s\n")
    print(markdown_table(["op", "size", "config (blocks, warps, stages)", "us", "% copy", "notes"],
                         report))
    if best:
        print("\n| op | size | best config | us | % copy | shipped us | speedup |")
        print("|---|---|---|---:|---:|---:|---:|")
        for key, (ms, cfg, _, nbytes, shipped) in best.items():
            print(f"| {key[0]} | {key[1:]} | {cfg} | {ms * 1e3:,.1f} | {100 * nbytes / ms / 1e6 / copy_gbs:.0f}% | "
                  f"{shipped * 1e3:,.1f} | {shipped / ms:.2f}x |")

    if args.then_e2e and not args.compile_only:
        rows = sorted({v[2]: v[1] for k, v in reversed(best.items()) if k[0] == "moe"}.items())   # T=1 wins bucket 1
        moe.MOE_CONFIGS = [(per_expert if i < len(rows) - 1 else math.inf, *cfg) for i, (per_expert, cfg) in enumerate(rows)]
        lin = sorted((v[2], v[1]) for k, v in best.items() if k[0] == "w4a16" and k[2] == 18432)
        if lin:
            w4a16.W4A16_CONFIGS = [(m if i < len(lin) - 1 else math.inf, *cfg) for i, (m, cfg) in enumerate(lin)]
        print("\ninstalled MOE_CONFIGS =", moe.MOE_CONFIGS, "\ninstalled W4A16_CONFIGS =", w4a16.W4A16_CONFIGS, flush=True)
        import bench_e2e
        bench_e2e.main(["--layers", "3", "--workdir", "/dev/shm", "--batches", "1,8,32", "--contexts", "1024",
                        "--prompts", "1024,8192", "--no-hf", "--plot", "/tmp/e2e_tuned.png"])


if __name__ == "__main__":
    sys.exit(main())
