"""Compile every kernel for a GPU that is not here: `python -m kimi_engine.kernels.aot`.

The Triton interpreter checks what a kernel computes but not whether it compiles: it accepts
shapes, dtypes and layouts the real compiler rejects, and it says nothing of registers or shared
memory. This tool runs each wrapper at Kimi K2's own shapes on CPU tensors with Triton pointed at
an NVIDIA target (sm_90 by default: H100 / H200). Every launch compiles (TTIR -> PTX -> cubin with
Triton's ptxas) and is never run. It prints, per compiled variant, registers per thread, spilled
bytes (local memory), shared memory and the tensor-core instruction chosen, and exits 1 when a
variant fails to compile, spills inside a loop, or needs more shared memory than one block may have.

The specialization is the one a real launch gets (pointer alignment, integer divisibility, the
config row each wrapper picks for the GPU), since the wrappers themselves make the calls.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import dataclasses
import re
import subprocess
import sys
import tempfile
import time
from typing import Callable, Iterator

import torch
import triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver
from triton.runtime.jit import JITFunction

from . import w4a16
from .mla_decode import mla_decode, mla_decode_kernel, mla_merge_kernel
from .moe import fused_moe, moe_down_kernel, moe_gate_up_kernel
from .routing import route, route_kernel
from .w4a16 import is_interpreted, w4a16_matmul, w4a16_matmul_kernel

KERNELS = (w4a16_matmul_kernel, moe_gate_up_kernel, moe_down_kernel, route_kernel, mla_decode_kernel, mla_merge_kernel)

# Per-block shared memory limits (bytes) and SM counts of the targets we care about.
SHARED_LIMIT = {90: 227 * 1024, 100: 227 * 1024, 80: 163 * 1024}
SM_COUNT = {90: 132, 100: 148, 80: 108}


class CompileOnlyDriver:
    """What Triton's launch path asks of a driver, answered for a device that is not present."""

    def __init__(self, target: GPUTarget):
        self.target = target

    def get_current_target(self) -> GPUTarget:
        return self.target

    def get_current_device(self) -> int:
        return 0

    def get_current_stream(self, device: int | None = None) -> int:
        return 0


@contextlib.contextmanager
def compile_only(arch: int) -> Iterator[list]:
    """Inside, every Triton launch compiles for sm_{arch} and returns without running; the compiled
    kernels are appended to the yielded list. Launch heuristics see the target's SM count and capability."""
    if is_interpreted(w4a16_matmul_kernel):
        raise RuntimeError("unset TRITON_INTERPRET: the interpreter never compiles")
    compiled: list = []
    run = JITFunction.run

    def compile_instead(self, *args, grid, warmup, **kwargs):
        kernel = run(self, *args, grid=grid, warmup=True, **kwargs)
        blocks = " ".join(f"{k}={v}" for k, v in kwargs.items() if k.startswith("BLOCK"))
        compiled.append((kernel, f"{blocks} warps={kwargs.get('num_warps', 4)} stages={kwargs.get('num_stages', 3)}"))
        return kernel

    stand_in, active = dict(w4a16.CPU_STAND_IN), driver._active   # no CUDA here: maybe no default driver
    # Each kernel keeps its compiled variants and its target per device: start empty, so this arch is
    # compiled, and put the real ones back after, so later launches never get a cubin for this target.
    caches = [kernel.device_caches for kernel in KERNELS]
    for kernel in KERNELS:
        kernel.device_caches = collections.defaultdict(kernel.create_binder)
    driver.set_active(CompileOnlyDriver(GPUTarget("cuda", arch, 32)))
    JITFunction.run = compile_instead
    w4a16.CPU_STAND_IN.update(sms=SM_COUNT.get(arch, stand_in["sms"]), capability=divmod(arch, 10))
    try:
        yield compiled
    finally:
        JITFunction.run, driver._active = run, active
        w4a16.CPU_STAND_IN.update(stand_in)
        for kernel, cache in zip(KERNELS, caches):
            kernel.device_caches = cache


@dataclasses.dataclass
class Variant:
    case: str
    kernel: str
    config: str
    registers: int
    spilled: int           # bytes of stack per thread: registers spilled to local memory
    loop_spills: int       # spill loads/stores inside a loop (the ones that cost bandwidth every iteration)
    shared: int            # bytes per block, static + dynamic
    tensor_cores: str      # wgmma (Hopper warpgroup MMA), mma (mma.sync), or -

    def problems(self, arch: int) -> list[str]:
        limit = SHARED_LIMIT.get(arch, SHARED_LIMIT[90])
        found = []
        if self.loop_spills:
            found.append(f"{self.loop_spills} spill loads/stores inside loops")
        if self.shared > limit:
            found.append(f"shared {self.shared} B > {limit} B")
        return found


def cuobjdump(cubin: bytes, flag: str) -> str:
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([triton.knobs.nvidia.cuobjdump.path, flag, f.name],
                              capture_output=True, text=True, check=True).stdout


def resource_usage(cubin: bytes) -> dict[str, int]:
    """REG / STACK / SHARED / LOCAL of the cubin's one function, as cuobjdump -res-usage reports them."""
    return {k: int(v) for k, v in re.findall(r"\b(REG|STACK|SHARED|LOCAL):(\d+)", cuobjdump(cubin, "-res-usage"))}


def spills_in_loops(sass: str) -> int:
    """Spill loads/stores (LDL/STL) whose address lies inside a loop: between a backward branch's
    target and the branch. A few spills in the prologue or epilogue cost nothing that matters."""
    code = [(int(a, 16), op) for a, op in re.findall(r"/\*([0-9a-f]{4,})\*/\s+([^;]*);", sass)]
    branches = [(addr, int(target, 16)) for addr, op in code if re.search(r"\bBRA\b", op)
                for target in re.findall(r"0x([0-9a-f]+)", op)]
    loops = [(target, addr) for addr, target in branches if target < addr]
    return sum(1 for addr, op in code if re.search(r"\b(LDL|STL)\b", op)
               and any(lo <= addr <= hi for lo, hi in loops))


def describe(case: str, kernel, config: str) -> Variant:
    md = kernel.metadata
    usage = resource_usage(kernel.asm["cubin"])
    ptx = kernel.asm["ptx"]
    cores = "wgmma" if "wgmma.mma_async" in ptx else "mma" if re.search(r"\bmma\.sync", ptx) else "-"
    return Variant(case, md.name, config, usage.get("REG", 0), usage.get("LOCAL", 0) + usage.get("STACK", 0),
                   spills_in_loops(cuobjdump(kernel.asm["cubin"], "-sass")),
                   usage.get("SHARED", 0) + md.shared, cores)


# ------------------------------------------------------------------------------------------ cases
def kimi_cases(dtype: torch.dtype, arch: int) -> list[tuple[str, Callable[[], object]]]:
    """The launches the engine makes at Kimi K2's widths, one per config row of each kernel's table
    (an fp8 cache only where the target converts e4m3: sm_89 and up)."""
    D, I, E, H, C, R, top_k = 7168, 2048, 384, 64, 512, 64, 8
    cases = []

    def int4(*shape):
        return torch.zeros(*shape[:-1], shape[-1] // 8, dtype=torch.int32), torch.ones(*shape[:-1], shape[-1] // 32, dtype=dtype)

    for M in (1, 16, 64, 256, 4096):          # every row of W4A16_CONFIGS
        cases.append((f"w4a16 M={M} [{2 * I}x{D}]", lambda M=M: w4a16_matmul(torch.zeros(M, D, dtype=dtype), *int4(2 * I, D))))
    # Experts: only as many as it takes to reach every row of MOE_CONFIGS (the compile ignores E).
    few = 8
    gate_up, down = int4(few, 2 * I, D), int4(few, D, I)
    for T in (1, 8, 32, 64):
        ids = (torch.arange(T * top_k) % few).view(T, top_k).int()
        cases.append((f"fused_moe T={T} E={few} top{top_k}",
                      lambda T=T, ids=ids: fused_moe(torch.zeros(T, D, dtype=dtype), *gate_up, *down,
                                                     torch.ones(T, top_k), ids)))
    cases.append((f"route E={E} top{top_k}", lambda: route(torch.zeros(4, E), torch.zeros(E), top_k)))
    cases.append(("route E=256 8 groups top4 (DeepSeek-V3)", lambda: route(torch.zeros(4, 256), torch.zeros(256), 8, 8, 4)))
    block_size, ctx = 64, 4096
    for heads in (64, 32, 16, 8):             # 1, 2, 4, 8 tensor-parallel ranks
        for kv_dtype in (dtype, torch.float8_e4m3fn) if arch >= 89 else (dtype,):
            def attend(heads=heads, kv_dtype=kv_dtype):
                blocks = ctx // block_size
                cache = torch.zeros(blocks, block_size, C + R, dtype=kv_dtype)
                scale = torch.ones(blocks, block_size, 2) if kv_dtype == torch.float8_e4m3fn else None
                return mla_decode(torch.zeros(1, heads, C, dtype=dtype), torch.zeros(1, heads, R, dtype=dtype), cache,
                                  torch.arange(blocks, dtype=torch.int32)[None], torch.tensor([ctx], dtype=torch.int32),
                                  0.1, scale)
            kv_name = "fp8" if kv_dtype == torch.float8_e4m3fn else str(kv_dtype).removeprefix("torch.")
            cases.append((f"mla_decode H={heads} kv={kv_name} ctx={ctx}", attend))
    return cases


def compile_all(arch: int, dtype: torch.dtype) -> tuple[list[Variant], list[str]]:
    variants, failures, seen = [], [], set()
    for case, launch in kimi_cases(dtype, arch):
        with compile_only(arch) as compiled:
            try:
                launch()
            except Exception as e:        # report every case, not just the first failure
                failures.append(f"{case}: {type(e).__name__}: {(str(e).strip().splitlines() or [''])[-1][:300]}")
                continue
        for kernel, config in compiled:
            if kernel.metadata.hash not in seen:
                seen.add(kernel.metadata.hash)
                variants.append(describe(case, kernel, config))
    return variants, failures


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--arch", type=int, default=90, help="compute capability x 10 (90: H100/H200)")
    p.add_argument("--dtype", choices=["bfloat16", "float16"], default="bfloat16")
    args = p.parse_args(argv)
    start = time.perf_counter()
    variants, failures = compile_all(args.arch, getattr(torch, args.dtype))
    print(f"Kernels compiled for sm_{args.arch} at Kimi K2 widths ({args.dtype}), Triton {triton.__version__}, "
          f"{time.perf_counter() - start:.0f} s")
    print("| case | kernel | config | regs | spilled B | spill ld/st in loops | shared KB | tensor cores | ok |")
    print("|---|---|---|---:|---:|---:|---:|---|---|")
    bad = list(failures)
    for v in variants:
        problems = v.problems(args.arch)
        bad += [f"{v.case} / {v.kernel}: {p}" for p in problems]
        print(f"| {v.case} | {v.kernel} | {v.config} | {v.registers} | {v.spilled} | {v.loop_spills} | {v.shared / 1024:.1f} | "
              f"{v.tensor_cores} | {'; '.join(problems) or 'yes'} |")
    for line in bad:
        print("FAIL", line, file=sys.stderr)
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
