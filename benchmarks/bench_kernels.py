"""The Triton kernels at Kimi K2 shapes: time, bytes, GB/s, % of copy bandwidth, TFLOP/s, speedup over baselines.

    python benchmarks/bench_kernels.py                       # CUDA: hidden 7168, I 2048, 384 experts, top-8
    python benchmarks/bench_kernels.py --interpret --small   # CPU smoke test under TRITON_INTERPRET=1

Random data (never all zero). Bytes are the floor a kernel must move: the weights it touches (for the
MoE, only the routed experts'), the activations in and the result out. "% copy" is achieved GB/s over
the device-to-device copy bandwidth measured in the same run. Baselines run in the same process:
  cuBLAS     torch bf16 matmul on the weight dequantized once beforehand (dequantization not timed);
             for the MoE, the per-expert loop over the touched experts' dequantized weights (it reads
             the ids back to the host and loops in Python: at small T its time is mostly launches, so
             there "vs cuBLAS" flatters the kernel beside a batched dense MoE)
  int4pack   torch.ops.aten._weight_int4pack_mm (tinygemm) where it supports the shape
  ref        the pure-torch reference (for the MoE: the per-expert loop, dequantizing each expert)
Speedups are baseline time / kernel time (> 1: the kernel is faster).
"""

from __future__ import annotations

import argparse
import os
import sys

if __name__ == "__main__" and "--interpret" in sys.argv:   # must precede the first triton import
    os.environ["TRITON_INTERPRET"] = "1"

import torch  # noqa: E402

from common import copy_bandwidth_gbs, device_name, markdown_table, save_roofline, time_ms  # noqa: E402
from kimi_engine.int4 import GROUP_SIZE, dequantize, unpack  # noqa: E402
from kimi_engine.kernels.moe import fused_moe, fused_moe_ref, moe_loop_ref  # noqa: E402
from kimi_engine.kernels.routing import route, route_ref  # noqa: E402
from kimi_engine.kernels.w4a16 import w4a16_matmul, w4a16_matmul_ref  # noqa: E402
from kimi_engine.synthetic import kimi_k2_config  # noqa: E402


def parse_args(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--interpret", action="store_true", help="run the kernels on CPU under TRITON_INTERPRET=1")
    ap.add_argument("--small", action="store_true", help="small shapes (for the interpreter)")
    ap.add_argument("--m", type=int, nargs="+", help="token counts (default 1 8 64 512 4096; small: 1 33)")
    ap.add_argument("--ops", nargs="+", default=["w4a16", "moe", "route"], choices=["w4a16", "moe", "route"])
    ap.add_argument("--plot", default="bench_kernels_roofline.png", help="roofline PNG (when matplotlib is present)")
    return ap.parse_args(argv)


K2 = kimi_k2_config(1)
FULL = dict(linear=[(7168, 2048), (2048, 7168), (18432, 7168)],       # weight [N out, K in]
            moe=(K2.hidden_size, K2.moe_intermediate_size, K2.n_routed_experts, K2.num_experts_per_tok),
            m=[1, 8, 64, 512, 4096])
SMALL = dict(linear=[(96, 128), (128, 96)], moe=(128, 64, 16, 4), m=[1, 33])


def random_int4(*shape_nk: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    """Random packed words [..., N, K/8] (every nibble uniform) and positive bf16 scales [..., N, K/G]."""
    *lead, n, k = shape_nk
    packed = torch.randint(-2**31, 2**31 - 1, (*lead, n, k // 8), dtype=torch.int32, device=device)
    scale = (0.5 + torch.rand(*lead, n, k // GROUP_SIZE, device=device)) * (2 / k) ** 0.5 / 4
    return packed, scale.to(torch.bfloat16)


def int4pack_fn(x, packed, scale):
    """A callable running aten._weight_int4pack_mm on the same weights, or None where unsupported."""
    try:
        nibbles = (unpack(packed).to(torch.int32) + 8)                      # [N, K] in [0, 15]
        # tinygemm: w = (nibble - 8) * scale + zero, with scale and zero interleaved as [K/G, N, 2]
        sz = torch.stack([scale, torch.zeros_like(scale)], -1).transpose(0, 1).contiguous().to(x.dtype)
        if x.is_cuda:   # two nibbles per byte, the even column in the high half (torch's own tests)
            w = torch.ops.aten._convert_weight_to_int4pack((nibbles[:, ::2] << 4 | nibbles[:, 1::2]).to(torch.uint8), 8)
            fn = lambda: torch.ops.aten._weight_int4pack_mm(x, w, GROUP_SIZE, sz)
        else:
            w = torch.ops.aten._convert_weight_to_int4pack_for_cpu(nibbles, 8)
            fn = lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(x, w, GROUP_SIZE, sz)
        err = rel_err(fn(), x.float() @ dequantize(packed, scale).T)
    except (RuntimeError, NotImplementedError):
        return None
    if err > 2e-2:     # a layout this script got wrong must not pass as a baseline
        print(f"warning: _weight_int4pack_mm disagrees with the reference (rel err {err:.1e}); skipped")
        return None
    return fn


def rel_err(out, ref) -> float:
    return ((out.float() - ref.float()).abs().max() / ref.float().abs().max().clamp_min(1e-30)).item()


def measure(name, shape, m, fn, nbytes, flops, baselines, device, copy_gbs, out, ref):
    """One table row; baselines: {name: callable or None}."""
    ms = time_ms(fn, device)
    gbs = nbytes / (ms * 1e-3) / 1e9
    row = [name, shape, m, f"{ms * 1e3:,.1f}", f"{nbytes / 1e6:,.2f}", f"{gbs:,.1f}", f"{100 * gbs / copy_gbs:.0f}%",
           f"{flops / (ms * 1e-3) / 1e12:.2f}" if flops else "-"]
    for base in ("cuBLAS", "int4pack", "ref"):
        b = baselines.get(base)
        row.append(f"{time_ms(b, device) / ms:.2f}x" if b is not None else "n/a")
    row.append(f"{rel_err(out, ref):.1e}")
    return row, (f"{name} {shape} M={m}", flops, nbytes, ms)


def bench_w4a16(cfg, device, dtype, copy_gbs):
    rows, points = [], []
    for n, k in cfg["linear"]:
        packed, scale = random_int4(n, k, device=device)
        w = dequantize(packed, scale, dtype)                            # for cuBLAS, dequantized once
        for m in cfg["m"]:
            x = torch.randn(m, k, device=device).to(dtype)
            nbytes = packed.numel() * 4 + scale.numel() * 2 + (m * k + m * n) * x.element_size()
            base = {"cuBLAS": lambda: x @ w.T, "int4pack": int4pack_fn(x, packed, scale),
                    "ref": lambda: w4a16_matmul_ref(x, packed, scale)}
            row, point = measure("w4a16", f"{n}x{k}", m, lambda: w4a16_matmul(x, packed, scale), nbytes, 2 * m * n * k,
                                 base, device, copy_gbs, w4a16_matmul(x, packed, scale), x.float() @ w.float().T)
            rows.append(row)
            points.append(point)
    return rows, points


def bench_moe(cfg, device, dtype, copy_gbs):
    d, i, e, top_k = cfg["moe"]
    gate_up = random_int4(e, 2 * i, d, device=device)
    down = random_int4(e, d, i, device=device)
    expert_bytes = sum(t[0].numel() * 4 + t[1].numel() * 2 for t in (gate_up, down)) / e
    rows, points = [], []
    for t in cfg["m"]:
        x = torch.randn(t, d, device=device).to(dtype)
        ids = torch.rand(t, e, device=device).topk(top_k, dim=1).indices.to(torch.int32)  # uniform, distinct
        weights = torch.rand(t, top_k, device=device) + 0.1
        touched = ids.unique().numel()
        nbytes = touched * expert_bytes + 2 * t * d * x.element_size()
        args = (x, *gate_up, *down, weights, ids)
        ref = fused_moe_ref(*args)
        base = {"cuBLAS": dense_moe_fn(x, gate_up, down, weights, ids), "ref": lambda: fused_moe_ref(*args)}
        row, point = measure("moe", f"E{e} top{top_k} ({touched} used)", t, lambda: fused_moe(*args), nbytes,
                             6 * t * top_k * d * i, base, device, copy_gbs, fused_moe(*args), ref)
        del base
        rows.append(row)
        points.append(point)
    return rows, points


def dense_moe_fn(x, gate_up, down, weights, ids):
    """The per-expert loop with cuBLAS bf16 matmuls on the touched experts, dequantized beforehand; None on OOM."""
    try:
        dense = {e: (dequantize(gate_up[0][e], gate_up[1][e], x.dtype), dequantize(down[0][e], down[1][e], x.dtype))
                 for e in ids.unique().tolist()}
    except torch.OutOfMemoryError:
        return None
    return lambda: moe_loop_ref(x, dense.__getitem__, weights, ids)


def bench_route(cfg, device, copy_gbs):
    _, _, e, top_k = cfg["moe"]
    args = (top_k, K2.n_group, K2.topk_group, K2.norm_topk_prob, K2.routed_scaling_factor)
    rows = []
    for t in cfg["m"]:
        logits, bias = torch.randn(t, e, device=device), 0.1 * torch.randn(e, device=device)
        nbytes = logits.numel() * 4 + bias.numel() * 4 + t * top_k * 8
        out, ref = route(logits, bias, *args), route_ref(logits, bias, *args)
        row, _ = measure("route", f"E{e} top{top_k}", t, lambda: route(logits, bias, *args), nbytes, 0,
                         {"ref": lambda: route_ref(logits, bias, *args)}, device, copy_gbs, out[0], ref[0])
        row[-1] += f" (ids {'equal' if torch.equal(out[1], ref[1]) else 'DIFFER'})"
        rows.append(row)
    return rows


def main(argv=None):
    args = parse_args(argv)
    device = torch.device("cpu" if args.interpret or not torch.cuda.is_available() else "cuda")
    if device.type == "cpu" and not args.interpret:
        raise SystemExit("no CUDA device: run with --interpret --small for a CPU smoke test")
    cfg = dict(SMALL if args.small else FULL)
    cfg["m"] = args.m or cfg["m"]
    dtype = torch.float32 if args.interpret else torch.bfloat16    # the interpreter's dot needs float32
    torch.manual_seed(0)
    copy_gbs = copy_bandwidth_gbs(device)
    print(f"device: {device_name(device)}   dtype: {dtype}   copy bandwidth: {copy_gbs:,.0f} GB/s"
          + ("   (TRITON_INTERPRET=1: times are the interpreter's, not the kernels')" if args.interpret else ""))
    header = ["op", "shape", "M", "time us", "MB moved", "GB/s", "% copy", "TFLOP/s",
              "vs cuBLAS", "vs int4pack", "vs ref", "max rel err"]
    rows, points = [], []
    if "w4a16" in args.ops:
        r, p = bench_w4a16(cfg, device, dtype, copy_gbs)
        rows += r
        points += p
    if "moe" in args.ops:
        r, p = bench_moe(cfg, device, dtype, copy_gbs)
        rows += r
        points += p
    if "route" in args.ops:
        rows += bench_route(cfg, device, copy_gbs)
    print(markdown_table(header, rows))
    if "moe" in args.ops:
        print("- moe 'vs cuBLAS': a per-expert loop of cuBLAS matmuls with a host sync, not a batched dense MoE")
    if points and args.plot and save_roofline(points, copy_gbs, args.plot, f"kimi-engine kernels on {device_name(device)}"):
        print(f"roofline: {args.plot}")


if __name__ == "__main__":
    main()
