"""The CPU decode kernels (cpu_kernels.cpp): built on first use, cached, loaded with ctypes.

What they do: y = x W^T for bf16 W and for Kimi's INT4 W (packed nibbles, a bf16 scale per 32
inputs), a fused SiLU-gated MLP (one call: gate, up, down), a fused routed-expert MoE (one call per
layer; each touched expert read once for all of its tokens), absorbed MLA's per-head products and its
decode attention over the paged cache, RMSNorm, rope and the noaux_tc router. Weight rows are streamed
one at a time with a software prefetch (see cpu_kernels.cpp).
Weights stay as stored; activations may be float32 or bf16; sums are float32. bf16 widens to float32
by a shift; an INT4 nibble becomes bf16(q) through vpermw (then vdpbf16ps) for bf16 activations and
float(q) through vpermps (then FMA) for float32 ones, so float32 activations read the same bytes as
bf16 ones and are not rounded. Decode attention with a bf16 query and cache multiplies with
vdpbf16ps too, rounding its softmax weights to bf16 before they meet the values (as the Triton
kernel and HF's attention do; mla_decode_ref keeps float32); float32 stays float32 throughout. The weights live in
transparent huge pages (empty_weight).

Why this and not the alternatives (measured on this 2-core AMD EPYC Zen 4 VM, AVX-512 with BF16,
DeepSeek-V3 layers of hidden 2048):
  - torch's `_weight_int4pack_mm_for_cpu` reads INT4 at ~6.5 GB/s in bf16 and ~0.13 GB/s in
    float32; bf16 `F.linear` streams at ~9-19 GB/s, float32 at ~15 GB/s but over twice the bytes.
    Here: the 131 MB lm_head at 22-34 GB/s on 2 threads (busy to quiet machine; torch bf16: 13-19),
    the 64-expert MoE layer of the benchmark model at 21-26 GB/s from DRAM.
  - The reference MoE is a Python loop of ~10 torch ops per expert; the absorbed-MLA einsums copy
    a transposed kv_b weight every step (2 MB per layer). Fewer, larger calls also mean fewer
    thread wake-ups per step, which is what collapses on a shared machine (below).
  - torch.compile of the step costs minutes of compilation on two cores (every process, every new
    shape) and would still call the same slow matmuls.
  - A torch C++ extension (torch.utils.cpp_extension) spends ~1 minute compiling torch's headers;
    this file includes none and builds in ~1.5 s, so a fresh machine (and the test suite) builds it
    on first use. Nothing in it depends on torch's ABI.
  - Dense products of more than a few rows (prefill, a long cached-prefix continuation) go to
    torch's oneDNN GEMM, which blocks for registers where these kernels stream: more than 4 rows
    in bf16 (oneDNN's vdpbf16ps: 101-119 GFLOP/s at 8 rows, 377 at 128, against 42-80 here),
    more than 16 in float32 (cpu_dispatch.MAX_ROWS has the measurements). A batched decode step
    stays here whatever its batch (cpu_step: 86 tok/s at batch 8 against 66 through the modules).
  - The loader puts CPU weights in 2 MB pages (empty_weight): a 2-thread read of 1 GiB at 29 GB/s
    in 4 KB pages, 32 in 2 MB ones; the benchmark model's bf16 decode at 45.0 against 48.9 tok/s
    (medians, 4 processes each way, alternating).
  - Tried and not kept (in-engine A/B, one process per variant, alternating): int8 activations for
    the experts (vpdpbusd: llama.cpp's Q4_0 x Q8_0 arithmetic, half the instructions per weight):
    a batch-1 MoE layer no faster (1.18-1.41 ms against 1.21-1.35 exact), 8% faster at 128 tokens,
    ~1.2% relative error in its output; prefetch distances and hints (37.1-38.4 tok/s, within the
    noise); the nibble
    made bf16(128 + n) by one vpternlogd instead of a vpermw lookup, corrected by the activations'
    sums (the tile 10% faster from L2, the step's experts no faster, 128-token prefill 9% slower);
    float32 nibbles masked in place and converted (vcvtdq2ps) instead of vpermps (no faster: each
    512-bit op takes a cycle on this core, and the float32 tile needs about three per 16 weights
    where the bf16 one needs one: 7.2-7.6 against 4.5 ns per 128 weights from L2); float32
    activations split exactly into three bf16 parts (hi + mid + lo) for the vdpbf16ps tile: 12-16%
    slower than vpermps + FMA (19.0-20.4 against 22.6-23.0 GB/s, 2 threads, from DRAM). A batch-1
    step is bound by how fast two cores stream; the INT4 tiles are close to their op count as well
    (one core, a [12288, 2048] weight from L2 / from DRAM: bf16 tile 20 / 13-14 GB/s, float32 tile
    14 / 11; two threads from DRAM 27 and 23, where a bf16 matrix streams at 31), which is why
    float32's experts take ~1.3x bf16's time.

Threading: the kernels have their own pool (set_threads; ops.set_threads sets it and torch's). A
job ends when its tasks are done, not when every thread has reached a barrier, so a worker that the
OS has descheduled costs one task, not a time slice per op. torch's pool does wait at barriers: with
the machine shared (load average ~11 on 2 cores) a bf16 decode of the benchmark model ran at 0.9
tok/s with 2 torch threads inside the step and 3.8 with 1 (kernels on 2 threads; 3.2 with the
kernels on 1), so decode steps run torch's small ops on one thread (ops.small_ops_threads; that
also keeps torch's OpenMP workers from spinning on the kernels' cores after a parallel op).

Build: `$CXX` (default `c++`) with -O3 -march=native into `$KIMI_ENGINE_CACHE` (default
~/.cache/kimi_engine), named by a hash of the source, the flags, the compiler and this CPU's
flags, so a new source or another CPU builds again. Anything failing (no compiler, no AVX-512,
KIMI_ENGINE_CPU_KERNELS=0) leaves `available()` False with the reason in `unavailable_reason()`
(and one RuntimeWarning), and ops.py falls back to torch.
"""

from __future__ import annotations

import ctypes
import hashlib
import math
import mmap
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import torch

SOURCE = Path(__file__).with_name("cpu_kernels.cpp")
FLAGS = ["-O3", "-march=native", "-std=c++17", "-shared", "-fPIC", "-pthread"]
ENV_SWITCH = "KIMI_ENGINE_CPU_KERNELS"   # "0" turns the kernels off
ABI_VERSION = 3                          # kt_version() of the source this wrapper speaks to
MLA_MAX_BLOCK = 256                      # cache block sizes kt_mla_decode takes
INT4_GROUPS = (32, 64, 128)              # group sizes the kernel takes (and multiples of 128)

_lock = threading.Lock()
_lib: ctypes.CDLL | None = None
_reason: str | None = None
_tried = False


def _cpu_flags() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("flags"):
                return line
    except OSError:
        pass
    return platform.processor()


def cache_dir() -> Path:
    return Path(os.environ.get("KIMI_ENGINE_CACHE") or Path.home() / ".cache" / "kimi_engine")


def _compiler() -> str:
    return os.environ.get("CXX") or "c++"


def _library_path(cxx: str) -> Path:
    try:
        version = subprocess.run([cxx, "--version"], capture_output=True, text=True, timeout=30).stdout
    except (OSError, subprocess.SubprocessError) as e:
        raise RuntimeError(f"no C++ compiler {cxx!r} ({e}); set CXX") from None
    key = hashlib.sha256("\0".join([SOURCE.read_text(), " ".join(FLAGS), cxx, version, _cpu_flags()]).encode())
    return cache_dir() / f"kimi_cpu_kernels-{key.hexdigest()[:16]}.so"


def _build() -> ctypes.CDLL:
    if os.environ.get(ENV_SWITCH, "1").strip() == "0":
        raise RuntimeError(f"{ENV_SWITCH}=0")
    if platform.machine().lower() not in ("x86_64", "amd64"):
        raise RuntimeError(f"the kernels are x86-64 AVX-512 code; this machine is {platform.machine()}")
    cxx = _compiler()
    if shutil.which(cxx) is None:
        raise RuntimeError(f"no C++ compiler {cxx!r} on PATH; set CXX")
    lib_path = _library_path(cxx)
    if not lib_path.exists():
        lib_path.parent.mkdir(parents=True, exist_ok=True)
        # Built under a temporary name and renamed: another process may be building the same file.
        fd, tmp = tempfile.mkstemp(suffix=".so", dir=lib_path.parent)
        os.close(fd)
        try:
            r = subprocess.run([cxx, *FLAGS, str(SOURCE), "-o", tmp], capture_output=True, text=True, timeout=300)
            if r.returncode:
                raise RuntimeError(f"{cxx} failed to build {SOURCE.name}: {r.stderr.strip()[-2000:]}")
            os.replace(tmp, lib_path)
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
    lib = ctypes.CDLL(str(lib_path))
    if lib.kt_version() != ABI_VERSION:
        raise RuntimeError(f"{lib_path} is version {lib.kt_version()}, expected {ABI_VERSION}")
    p, i64, i32 = ctypes.c_void_p, ctypes.c_int64, ctypes.c_int
    lib.kt_set_threads.argtypes = [i32]
    lib.kt_set_spin.argtypes = [i32]
    lib.kt_linear_bf16.argtypes = [p, i32, i64, i64, p, i64, p, i32]
    lib.kt_linear_int4.argtypes = [p, i32, i64, i64, p, p, i64, i64, p, i32]
    lib.kt_mlp_bf16.argtypes = [p, i32, i64, i64, i64, p, p, p, p, i32]
    lib.kt_heads_bf16.argtypes = [p, i32, i64, i64, i64, p, i64, i64, i64, i32, p, i32]
    lib.kt_moe_int4.argtypes = [p, i32, i64, i64, i64, i64, i64, p, p, p, p, p, p, i64, p, i32]
    lib.kt_rmsnorm.argtypes = [p, i32, i64, i64, i64, p, i32, ctypes.c_float, p, i32]
    lib.kt_route.argtypes = [p, p, i64, i64, i64, i64, i64, i32, ctypes.c_float, p, p]
    lib.kt_rope.argtypes = [p, i32, i64, i64, i64, i64, i64, p, p, p]
    lib.kt_mla_decode.argtypes = [p, p, i32, i64, i64, i64, i64, p, i32, i64, p, i64, p, ctypes.c_float, p, i32]
    lib.kt_decode_step.argtypes = [p, i64, p, p, p, p, p, p, i32, i64, p, i64, p, p, p]
    for fn in (lib.kt_decode_step, lib.kt_set_threads, lib.kt_set_spin, lib.kt_linear_bf16, lib.kt_linear_int4, lib.kt_mlp_bf16,
               lib.kt_heads_bf16, lib.kt_moe_int4, lib.kt_mla_decode, lib.kt_rmsnorm, lib.kt_rope,
               lib.kt_route):
        fn.restype = None
    lib.kt_set_threads(torch.get_num_threads())
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernels, building them the first time; None (and a warning, once) if they cannot be."""
    global _lib, _reason, _tried
    if _tried:
        return _lib
    with _lock:
        if not _tried:
            try:
                _lib = _build()
            except Exception as e:   # any failure to build or load means: use the torch path
                _reason = str(e)
                if os.environ.get(ENV_SWITCH, "1").strip() != "0":
                    warnings.warn(f"kimi-engine CPU kernels unavailable, using torch: {e}", RuntimeWarning, stacklevel=3)
            _tried = True
    return _lib


def available() -> bool:
    return library() is not None


def unavailable_reason() -> str | None:
    library()
    return _reason


def reset() -> None:
    """Forget the loaded library so the next call builds (or fails) again; for tests."""
    global _lib, _reason, _tried
    with _lock:
        _lib, _reason, _tried = None, None, False


def set_threads(n: int) -> None:
    """Threads the kernels use (the caller included)."""
    if n < 1:
        raise ValueError(f"threads={n} must be at least 1")
    lib = library()
    if lib is not None:
        lib.kt_set_threads(int(n))


def get_threads() -> int:
    lib = library()
    return 1 if lib is None else lib.kt_get_threads()


# ------------------------------------------------------------------------------------------ memory
HUGE_PAGE = 2 << 20


def empty_weight(shape: tuple[int, ...] | torch.Size, dtype: torch.dtype) -> torch.Tensor:
    """torch.empty for a CPU weight the kernels stream, in memory advised to be transparent huge pages.

    A decode step reads every weight once, front to back; in 4 KB pages the reads cross a page (a
    TLB entry, a boundary the hardware prefetcher stops at) every 4 KB. Measured on the 2-core Zen 4
    box, alternating: a 2-thread read of 1 GiB at 29 GB/s in 4 KB pages, 32 in 2 MB ones; the
    benchmark model's bf16 decode (benchmarks/bench_cpu.py) at 48.9 tok/s against 45.0 (medians of 4
    processes each way). The memory is an anonymous mapping of its own,
    aligned to 2 MB and advised (MADV_HUGEPAGE) before anything touches it, so that the first write
    faults huge pages in where the kernel has them (THP "madvise" or "always"; elsewhere, and for
    weights under 2 MB, it is ordinary memory). The alignment costs address space, not memory."""
    nbytes = math.prod(shape) * dtype.itemsize
    madvise = getattr(mmap, "MADV_HUGEPAGE", None)
    if nbytes < HUGE_PAGE or madvise is None:
        return torch.empty(shape, dtype=dtype)
    region = mmap.mmap(-1, nbytes + HUGE_PAGE, flags=mmap.MAP_PRIVATE | mmap.MAP_ANONYMOUS)
    address = ctypes.addressof(ctypes.c_char.from_buffer(region))
    offset = -address % HUGE_PAGE
    try:
        region.madvise(madvise, offset, nbytes // HUGE_PAGE * HUGE_PAGE)
    except OSError:   # a kernel built without THP: the memory is ordinary, the weight as good
        pass
    return torch.frombuffer(region, dtype=dtype, count=math.prod(shape), offset=offset).view(shape)


# ------------------------------------------------------------------------------------------ wrappers
ACT_DTYPES = (torch.float32, torch.bfloat16)


def _ptr(t: torch.Tensor) -> int:
    return t.data_ptr()


def _check_act(name: str, x: torch.Tensor, K: int) -> None:
    if x.dtype not in ACT_DTYPES or x.device.type != "cpu" or not x.is_contiguous():
        raise ValueError(f"{name}: x must be a contiguous float32/bfloat16 CPU tensor, got {x.dtype} on {x.device}")
    if x.dim() != 2 or x.shape[1] != K:
        raise ValueError(f"{name}: x is {tuple(x.shape)}, expected [M, {K}]")


def _check_weight(name: str, w: torch.Tensor, dtype: torch.dtype, shape: tuple) -> None:
    if w.dtype != dtype or w.device.type != "cpu" or not w.is_contiguous() or tuple(w.shape) != tuple(shape):
        raise ValueError(f"{name}: expected a contiguous {dtype} CPU tensor of shape {list(shape)}, "
                         f"got {w.dtype} {list(w.shape)} on {w.device}")


def linear_bf16(x: torch.Tensor, weight: torch.Tensor, out_dtype: torch.dtype | None = None) -> torch.Tensor:
    """x [M, K] (float32 or bf16) @ weight [N, K] (bf16).T -> [M, N] in out_dtype (default x.dtype);
    float32 arithmetic."""
    N, K = weight.shape
    _check_act("linear_bf16", x, K)
    _check_weight("linear_bf16 weight", weight, torch.bfloat16, (N, K))
    y = torch.empty(x.shape[0], N, dtype=out_dtype or x.dtype)
    library().kt_linear_bf16(_ptr(x), x.dtype == torch.bfloat16, x.shape[0], K, _ptr(weight), N, _ptr(y),
                             y.dtype == torch.bfloat16)
    return y


def int4_supported(K: int, group_size: int) -> bool:
    return group_size > 0 and K % group_size == 0 and (group_size in INT4_GROUPS or group_size % 128 == 0)


def linear_int4(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [M, K] @ INT4 weight (packed int32 [N, K/8], scale bf16 [N, K/G]).T -> [M, N] in x.dtype."""
    N, K = packed.shape[0], packed.shape[1] * 8
    G = K // max(scale.shape[-1], 1)
    _check_act("linear_int4", x, K)
    _check_weight("linear_int4 packed", packed, torch.int32, (N, K // 8))
    _check_weight("linear_int4 scale", scale, torch.bfloat16, (N, K // G))
    if not int4_supported(K, G):
        raise ValueError(f"linear_int4: group size {G} (K={K}) is not one the kernel takes")
    y = torch.empty(x.shape[0], N, dtype=x.dtype)
    library().kt_linear_int4(_ptr(x), x.dtype == torch.bfloat16, x.shape[0], K, _ptr(packed), _ptr(scale), G, N,
                             _ptr(y), y.dtype == torch.bfloat16)
    return y


def mlp_bf16(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """down(silu(x @ gate.T) * (x @ up.T)): x [M, D], gate/up bf16 [I, D], down bf16 [D, I] -> [M, D] in x.dtype."""
    I, D = gate.shape
    _check_act("mlp_bf16", x, D)
    _check_weight("mlp_bf16 gate", gate, torch.bfloat16, (I, D))
    _check_weight("mlp_bf16 up", up, torch.bfloat16, (I, D))
    _check_weight("mlp_bf16 down", down, torch.bfloat16, (D, I))
    y = torch.empty_like(x)
    library().kt_mlp_bf16(_ptr(x), x.dtype == torch.bfloat16, x.shape[0], D, I, _ptr(gate), _ptr(up), _ptr(down),
                          _ptr(y), y.dtype == torch.bfloat16)
    return y


def heads_bf16(x: torch.Tensor, weight: torch.Tensor, n_heads: int, first_row: int, n_rows: int,
               transposed: bool) -> torch.Tensor:
    """Per-head products with head h's rows [first_row, first_row + n_rows) of weight [H * R, C] (bf16):
    transposed=False: x [M, H, C] -> [M, H, n_rows], y = x @ rows^T (absorbed MLA: latent -> value);
    transposed=True:  x [M, H, n_rows] -> [M, H, C], y = x @ rows (absorbed MLA: q_nope -> latent)."""
    HR, C = weight.shape
    if HR % n_heads or first_row < 0 or first_row + n_rows > HR // n_heads:
        raise ValueError(f"heads_bf16: rows [{first_row}, {first_row + n_rows}) of {HR // max(n_heads, 1)} per head "
                         f"do not fit weight {list(weight.shape)} with n_heads={n_heads}")
    _check_weight("heads_bf16 weight", weight, torch.bfloat16, (HR, C))
    K_in, n_out = (n_rows, C) if transposed else (C, n_rows)
    if x.dim() != 3 or tuple(x.shape[1:]) != (n_heads, K_in):
        raise ValueError(f"heads_bf16: x is {tuple(x.shape)}, expected [M, {n_heads}, {K_in}]")
    _check_act("heads_bf16", x.view(-1, K_in), K_in)
    y = torch.empty(x.shape[0], n_heads, n_out, dtype=x.dtype)
    w = weight[first_row:]   # a view: head h's rows start at h * (HR / H) rows past it
    library().kt_heads_bf16(_ptr(x), x.dtype == torch.bfloat16, x.shape[0], n_heads, K_in, _ptr(w), (HR // n_heads) * C,
                            C, n_out, bool(transposed), _ptr(y), y.dtype == torch.bfloat16)
    return y


def moe_int4(x, gate_up_packed, gate_up_scale, down_packed, down_scale, topk_weights, topk_ids) -> torch.Tensor:
    """Routed INT4 experts x [T, D] -> [T, D] in x.dtype, as fused_moe_ref (ids of -1 contribute nothing).
    gate_up packed [E, 2I, D/8] + scale bf16 [E, 2I, D/G]; down [E, D, I/8] + [E, D, I/G];
    topk_weights [T, K] (float32 here), topk_ids [T, K] int32."""
    E, I2, D8 = gate_up_packed.shape
    D, I = D8 * 8, I2 // 2
    G = D // max(gate_up_scale.shape[-1], 1)
    _check_act("moe_int4", x, D)
    _check_weight("moe_int4 gate_up_packed", gate_up_packed, torch.int32, (E, 2 * I, D // 8))
    _check_weight("moe_int4 gate_up_scale", gate_up_scale, torch.bfloat16, (E, 2 * I, D // G))
    _check_weight("moe_int4 down_packed", down_packed, torch.int32, (E, D, I // 8))
    _check_weight("moe_int4 down_scale", down_scale, torch.bfloat16, (E, D, I // G))
    if not (int4_supported(D, G) and int4_supported(I, G)):
        raise ValueError(f"moe_int4: group size {G} (D={D}, I={I}) is not one the kernel takes")
    T, K = topk_ids.shape
    ids = topk_ids.to(torch.int32).contiguous()
    weights = topk_weights.to(torch.float32).contiguous()
    if x.shape[0] != T or tuple(weights.shape) != (T, K):
        raise ValueError(f"moe_int4: x {tuple(x.shape)}, topk_ids {tuple(ids.shape)} and topk_weights "
                         f"{tuple(weights.shape)} disagree")
    y = torch.empty_like(x)
    library().kt_moe_int4(_ptr(x), x.dtype == torch.bfloat16, T, D, I, E, G, _ptr(gate_up_packed),
                          _ptr(gate_up_scale), _ptr(down_packed), _ptr(down_scale), _ptr(ids), _ptr(weights), K,
                          _ptr(y), y.dtype == torch.bfloat16)
    return y


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """weight * round(x * rsqrt(mean(x^2) + eps)) over the last dim, float32 sums, the normalized rows
    rounded to x's dtype before the scale: x [..., D] (rows may be strided, the last dim not), weight [D]."""
    D = x.shape[-1]
    if x.dtype not in ACT_DTYPES or weight.dtype not in ACT_DTYPES or tuple(weight.shape) != (D,):
        raise ValueError(f"rms_norm: x {x.dtype} {tuple(x.shape)} and weight {weight.dtype} {tuple(weight.shape)} "
                         "must be float32/bfloat16 [..., D] and [D]")
    x2 = x.reshape(-1, D)
    if x2.stride(-1) != 1:
        x2 = x2.contiguous()
    w = weight.contiguous()
    y = torch.empty(x2.shape, dtype=torch.promote_types(x.dtype, weight.dtype))
    library().kt_rmsnorm(_ptr(x2), x2.dtype == torch.bfloat16, x2.shape[0], D, x2.stride(0), _ptr(w),
                         w.dtype == torch.bfloat16, float(eps), _ptr(y), y.dtype == torch.bfloat16)
    return y.view(x.shape)


def route(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int, topk_group: int,
          norm_topk_prob: bool, routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """The noaux_tc router as routing.route_ref (the same choices, ties to the lower index): logits [T, E]
    -> (weights [T, K] float32, ids [T, K] int32)."""
    T, E = logits.shape
    if not 0 < top_k <= E or n_group < 1 or E % n_group or not 0 < topk_group <= n_group:
        raise ValueError(f"route: top_k={top_k}, n_group={n_group}, topk_group={topk_group} do not fit {E} experts")
    if n_group > 1 and topk_group * (E // n_group) < top_k:
        raise ValueError(f"route: {topk_group} groups of {E // n_group} experts hold fewer than top_k={top_k}")
    x = logits.float().contiguous()
    b = None if bias is None else bias.float().contiguous()
    if b is not None and tuple(b.shape) != (E,):
        raise ValueError(f"route: bias {tuple(b.shape)} does not match {E} experts")
    weights = torch.empty(T, top_k, dtype=torch.float32)
    ids = torch.empty(T, top_k, dtype=torch.int32)
    library().kt_route(_ptr(x), None if b is None else _ptr(b), T, E, top_k, n_group, topk_group, bool(norm_topk_prob),
                       float(routed_scaling_factor), _ptr(weights), _ptr(ids))
    return weights, ids


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Interleaved-pair rope as model.apply_rope computes it (float32 math, the same bits): x [T, heads, R]
    (float32/bf16, strided, the last dim contiguous), cos/sin [T, R/2] float32 -> [T, heads, R] in x's dtype."""
    T, heads, R = x.shape
    if x.dtype not in ACT_DTYPES or x.stride(-1) != 1 or R % 2:
        raise ValueError(f"rope: x must be float32/bfloat16 [T, heads, R] with R even and unit last stride, got "
                         f"{x.dtype} {tuple(x.shape)} strides {x.stride()}")
    cos, sin = cos.float().contiguous(), sin.float().contiguous()
    if tuple(cos.shape) != (T, R // 2) or tuple(sin.shape) != (T, R // 2):
        raise ValueError(f"rope: cos {tuple(cos.shape)} and sin {tuple(sin.shape)} must be [{T}, {R // 2}]")
    y = torch.empty(x.shape, dtype=x.dtype)
    library().kt_rope(_ptr(x), x.dtype == torch.bfloat16, T, heads, R, x.stride(0), x.stride(1), _ptr(cos), _ptr(sin), _ptr(y))
    return y


def mla_decode(q_latent, q_rope, kv_cache, block_table, seq_lens, softmax_scale) -> torch.Tensor:
    """Absorbed MLA decode attention over the paged latent cache, as mla_decode_ref (float32 sums):
    q_latent [Q, H, C], q_rope [Q, H, R] (float32 or bf16), kv_cache [blocks, block_size, C + R]
    (float32 or bf16), block_table [Q, max_blocks] and seq_lens [Q] int32 -> [Q, H, C] in q_latent's dtype."""
    Q, H, C = q_latent.shape
    R = q_rope.shape[-1]
    if tuple(q_rope.shape) != (Q, H, R) or q_rope.dtype != q_latent.dtype or q_latent.dtype not in ACT_DTYPES:
        raise ValueError(f"mla_decode: q_latent {q_latent.dtype} {tuple(q_latent.shape)} and q_rope {q_rope.dtype} "
                         f"{tuple(q_rope.shape)} must be float32/bfloat16 [Q, H, C] and [Q, H, R]")
    if kv_cache.dim() != 3 or kv_cache.shape[-1] != C + R or kv_cache.dtype not in ACT_DTYPES or not kv_cache.is_contiguous():
        raise ValueError(f"mla_decode: kv_cache must be a contiguous float32/bfloat16 [blocks, block_size, {C + R}], "
                         f"got {kv_cache.dtype} {tuple(kv_cache.shape)}")
    if kv_cache.shape[1] > MLA_MAX_BLOCK:
        raise ValueError(f"mla_decode: block_size {kv_cache.shape[1]} is over the kernel's {MLA_MAX_BLOCK}")
    table = block_table.to(torch.int32).contiguous()
    lens = seq_lens.to(torch.int32).contiguous()
    if table.dim() != 2 or table.shape[0] != Q or tuple(lens.shape) != (Q,):
        raise ValueError(f"mla_decode: block_table {tuple(table.shape)} and seq_lens {tuple(lens.shape)} do not match {Q} queries")
    ql, qr = q_latent.contiguous(), q_rope.contiguous()
    out = torch.empty_like(ql)
    library().kt_mla_decode(_ptr(ql), _ptr(qr), ql.dtype == torch.bfloat16, Q, H, C, R, _ptr(kv_cache),
                            kv_cache.dtype == torch.bfloat16, kv_cache.shape[1], _ptr(table), table.shape[1], _ptr(lens),
                            float(softmax_scale), _ptr(out), out.dtype == torch.bfloat16)
    return out
