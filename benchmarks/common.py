"""Shared helpers for the benchmark scripts: timing, the copy-bandwidth yardstick, tables, roofline plots.

Import from a script in this directory (`from common import ...`); the scripts run as files, not a package.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def time_ms(fn: Callable[[], object], device: torch.device, reps: int = 3) -> float:
    """Median wall time of fn() in milliseconds.

    CUDA: triton.testing.do_bench (CUDA events, L2 flushed between runs, median of as many runs as fit
    in 100 ms). CPU: the median of `reps` timed calls after one warm-up (for smoke runs; not a measurement
    worth quoting).
    """
    if device.type == "cuda":
        import triton.testing
        return triton.testing.do_bench(fn, warmup=25, rep=100, return_mode="median")
    fn()
    times = []
    for _ in range(reps):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1e3)
    return statistics.median(times)


def copy_bandwidth_gbs(device: torch.device, nbytes: int | None = None) -> float:
    """Device-to-device copy bandwidth in GB/s (read + write bytes over time): the practical roof."""
    nbytes = nbytes or (2**30 if device.type == "cuda" else 64 * 2**20)
    src = torch.randint(-128, 127, (nbytes,), dtype=torch.int8, device=device)
    dst = torch.empty_like(src)
    ms = time_ms(lambda: dst.copy_(src), device, reps=10)
    return 2 * nbytes / (ms * 1e-3) / 1e9


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"CPU ({torch.get_num_threads()} threads)"


def markdown_table(header: list[str], rows: list[list[object]]) -> str:
    cells = [[str(c) for c in row] for row in [header, *rows]]
    widths = [max(len(row[i]) for row in cells) for i in range(len(header))]
    lines = ["| " + " | ".join(c.rjust(w) for c, w in zip(row, widths)) + " |" for row in cells]
    lines.insert(1, "|" + "|".join("-" * (w + 2) for w in widths) + "|")
    return "\n".join(lines)


def save_roofline(points: list[tuple[str, float, float, float]], bandwidth_gbs: float, path: str, title: str) -> bool:
    """Plot (label, flops, bytes, ms) points against the copy-bandwidth roof; False when matplotlib is absent."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    fig, ax = plt.subplots(figsize=(8, 5.5))
    intensities = [f / b for _, f, b, _ in points if f > 0]
    if intensities:
        lo, hi = min(intensities) / 2, max(intensities) * 2
        ax.plot([lo, hi], [bandwidth_gbs * lo / 1e3, bandwidth_gbs * hi / 1e3], "k--",
                label=f"copy bandwidth {bandwidth_gbs:,.0f} GB/s")
    for label, flops, nbytes, ms in points:
        if flops > 0:
            ax.scatter(flops / nbytes, flops / (ms * 1e-3) / 1e12, s=18)
            ax.annotate(label, (flops / nbytes, flops / (ms * 1e-3) / 1e12), fontsize=6)
    ax.set(xscale="log", yscale="log", xlabel="arithmetic intensity (FLOP / byte)", ylabel="TFLOP/s", title=title)
    ax.legend(loc="upper left")
    fig.tight_layout()
    fig.savefig(path, dpi=150)
    plt.close(fig)
    return True
