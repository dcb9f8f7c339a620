"""One function per hot op. The model calls these; each picks an implementation for its inputs.

KIMI_ENGINE_KERNELS chooses, read at every call (so tests can monkeypatch it):
    auto    (default) the Triton kernel for CUDA tensors; on the CPU the CPU kernels (kernels/cpu.py:
            bf16 and INT4 matmuls, the fused MLP and MoE, decode attention,
            RMSNorm, rope and the router; float32 arithmetic) where they built and take
            the shapes, else torch's INT4 kernel for bf16 INT4 matmuls (cpu_int4.py), else the reference
    triton  always the kernel; on CPU tensors that needs TRITON_INTERPRET=1 set before triton is imported
    torch   always the reference
bf16 experts have no kernel yet and run their reference under every setting; bf16 matmuls go to
cuBLAS through F.linear.
"""

from __future__ import annotations

import contextlib
import os

import torch
import torch.nn.functional as F

from . import cpu_int4
from .kernels import cpu as cpu_kernels
from .kernels import cpu_dispatch
from .kernels.mla_decode import mla_decode, mla_decode_ref
from .kernels.moe import fused_moe, fused_moe_ref, moe_loop_ref
from .kernels.routing import route as route_kernel
from .kernels.routing import route_ref
from .kernels.w4a16 import is_interpreted, w4a16_matmul, w4a16_matmul_kernel, w4a16_matmul_ref

KERNELS_ENV = "KIMI_ENGINE_KERNELS"
KERNEL_MODES = ("auto", "triton", "torch")


def kernel_mode() -> str:
    """The KIMI_ENGINE_KERNELS setting: 'auto' (also when unset or empty), 'triton' or 'torch'."""
    value = os.environ.get(KERNELS_ENV, "")
    mode = value.strip().lower() or "auto"
    if mode not in KERNEL_MODES:
        raise ValueError(f"{KERNELS_ENV}={value!r} is not one of {', '.join(KERNEL_MODES)}")
    return mode


def set_threads(n: int | None = None) -> int:
    """The CPU thread budget: n threads (default: the CPUs this process may run on) for the CPU
    kernels' pool and for torch's intra-op pool. Returns n. See decode_threads for decode steps."""
    if n is None:
        n = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else (os.cpu_count() or 1)
    if not isinstance(n, int) or n < 1:
        raise ValueError(f"threads={n!r} must be a positive integer")
    torch.set_num_threads(n)
    cpu_kernels.set_threads(n)
    return n


@contextlib.contextmanager
def small_ops_threads(device: torch.device, small: bool = True):
    """Around CPU work whose heavy ops run on the CPU kernels (a decode step; sampling its logits),
    when `small`: torch's own ops, all small, run on one thread. Two reasons, both measured on the
    shared 2-core box. torch's pool waits at a barrier after each op: with the cores shared, each can
    wait a whole time slice for a descheduled thread (1.3-6 decode tok/s with 2 torch threads
    against 9-15 with 1, while other jobs ran). And its OpenMP workers spin after each parallel op,
    taking a core from the kernels' pool: with sampling's ops on 2 threads (an index op over the
    logits among them) the benchmark model's decode step took 29 ms, with all on one 23. The kernels'
    own pool does not wait for late threads (cpu_kernels.cpp), so it keeps every thread."""
    single = (small and device.type == "cpu" and kernel_mode() == "auto" and torch.get_num_threads() > 1
              and cpu_kernels.available())
    if not single:
        yield
        return
    n = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        yield
    finally:
        torch.set_num_threads(n)


def decode_threads(tokens: torch.Tensor):
    """small_ops_threads around a forward pass that is a decode step (one new token per sequence)."""
    return small_ops_threads(tokens.device, tokens.dim() == 2 and tokens.shape[1] == 1)


def use_cpu_kernels(x: torch.Tensor, *weights: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether an INT4 op on CPU tensors runs the CPU kernels (auto mode, built, a shape they take)."""
    return kernel_mode() == "auto" and cpu_dispatch.int4_ok(x, *weights)


def use_cpu_int4(x: torch.Tensor, *weights: tuple[torch.Tensor, torch.Tensor]) -> bool:
    """Whether an INT4 op on CPU tensors runs torch's INT4 kernel (auto mode, a shape it takes)."""
    return kernel_mode() == "auto" and cpu_int4.supported(x, *weights)


def use_triton(x: torch.Tensor) -> bool:
    """Whether an op on `x` runs its Triton kernel under the current KIMI_ENGINE_KERNELS."""
    mode = kernel_mode()
    if mode == "torch" or (mode == "auto" and not x.is_cuda):
        return False
    if not x.is_cuda and not is_interpreted(w4a16_matmul_kernel):
        raise RuntimeError(f"{KERNELS_ENV}=triton on {x.device} tensors needs TRITON_INTERPRET=1 in the "
                           "environment before triton is first imported (or CUDA tensors)")
    return True


def linear(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ weight [N, K].T (a bf16 / float weight)."""
    if kernel_mode() == "auto" and not x.is_cuda:
        y = cpu_dispatch.linear(x, weight)
        if y is not None:
            return y
    return F.linear(x, weight)


def rms_norm(x: torch.Tensor, weight: torch.Tensor, eps: float) -> torch.Tensor:
    """RMSNorm over the last dim: normalize in float32, round to x's dtype, then scale (HF and
    DeepSeek's order)."""
    if kernel_mode() == "auto" and not x.is_cuda and cpu_dispatch.rms_norm_ok(x, weight):
        return cpu_kernels.rms_norm(x, weight, eps)
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + eps)
    return weight * x32.to(x.dtype)


def rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate interleaved pairs (x[2i], x[2i+1]) of x [B, S, ..., R] by cos/sin [B, S, R/2] (float32 math)."""
    if kernel_mode() == "auto" and not x.is_cuda and x.dim() in (3, 4) and cpu_dispatch.rope_ok(x):
        rows = x.flatten(0, 1) if x.dim() == 4 else x.flatten(0, 1).unsqueeze(1)   # [B*S, heads, R]
        return cpu_kernels.rope(rows, cos.flatten(0, 1), sin.flatten(0, 1)).view(x.shape)
    shape = cos.shape[:2] + (1,) * (x.dim() - 3) + cos.shape[2:]
    cos, sin = cos.view(shape), sin.view(shape)
    x0, x1 = x.float().unflatten(-1, (-1, 2)).unbind(-1)
    return torch.stack((x0 * cos - x1 * sin, x1 * cos + x0 * sin), dim=-1).flatten(-2).to(x.dtype)


def mlp(x: torch.Tensor, gate: torch.Tensor, up: torch.Tensor, down: torch.Tensor) -> torch.Tensor:
    """SiLU-gated MLP with float weights: down(silu(x gate^T) * (x up^T)); gate/up [I, D], down [D, I]."""
    if kernel_mode() == "auto" and not x.is_cuda:
        y = cpu_dispatch.mlp(x, gate, up, down)
        if y is not None:
            return y
    return linear(F.silu(linear(x, gate)) * linear(x, up), down)


def int4_linear(x: torch.Tensor, packed: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """x [..., K] @ INT4 weight (packed [N, K/8], scale [N, K/G]).T -> [..., N]."""
    x2 = x.reshape(-1, x.shape[-1])
    if use_triton(x):
        y = w4a16_matmul(x2, packed, scale, group_size=x.shape[-1] // max(scale.shape[-1], 1))
    elif use_cpu_kernels(x, (packed, scale)):
        y = cpu_kernels.linear_int4(x2.contiguous(), packed, scale)
    elif use_cpu_int4(x, (packed, scale)):
        y = cpu_int4.linear(x2, packed, scale)
    else:
        y = w4a16_matmul_ref(x2, packed, scale)
    return y.view(*x.shape[:-1], packed.shape[0])


# torch.mm(a, b, out_dtype) (CUDA, torch >= 2.8): a float32-output GEMM on bf16/fp16 operands.
_MM_OUT_DTYPE = hasattr(torch.ops.aten.mm, "dtype")


def router_logits(x: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """x [T, D] @ weight [E, D].T in float32, as HF's router computes it (both operands cast to float32).

    bf16/fp16 products are exact in float32, so on CUDA (and on the CPU kernels) a float32-output GEMM
    on the stored operands gives the same sums (up to their order) without materializing a float32 copy
    of the weight every step: at Kimi's widths that copy is 11 MB written and read again per MoE layer
    per decode step.
    """
    if _MM_OUT_DTYPE and x.is_cuda and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(x, weight.t(), out_dtype=torch.float32)
    if kernel_mode() == "auto" and not x.is_cuda:   # the CPU kernels sum in float32 too, reading bf16 weights
        y = cpu_dispatch.linear(x, weight, out_dtype=torch.float32)
        if y is not None:
            return y
    return F.linear(x.float(), weight.float())


def route(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int, topk_group: int,
          norm_topk_prob: bool, routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, K] float32, expert ids [T, K] int32); see route_ref."""
    if use_triton(logits):
        fn = route_kernel
    elif (kernel_mode() == "auto" and logits.device.type == "cpu" and cpu_kernels.available()
          and not (torch.is_grad_enabled() and logits.requires_grad)):   # the kernel has no backward
        fn = cpu_kernels.route
    else:
        fn = route_ref
    return fn(logits, bias, top_k, n_group, topk_group, norm_topk_prob, routed_scaling_factor)


def moe_int4(x, gate_up_packed, gate_up_scale, down_packed, down_scale, topk_weights, topk_ids):
    """Routed INT4 experts: x [T, D] -> [T, D]; see fused_moe_ref for the layout."""
    if use_triton(x):
        fn = fused_moe
    elif use_cpu_kernels(x, (gate_up_packed, gate_up_scale), (down_packed, down_scale)):
        fn = cpu_kernels.moe_int4
        x = x.contiguous()
    elif use_cpu_int4(x, (gate_up_packed, gate_up_scale), (down_packed, down_scale)):
        fn = cpu_int4.moe
    else:
        fn = fused_moe_ref
    return fn(x, gate_up_packed, gate_up_scale, down_packed, down_scale, topk_weights, topk_ids)


def moe_dense(x, gate_up_weight, down_weight, topk_weights, topk_ids):
    """Routed bf16 experts: gate_up [E, 2I, D], down [E, D, I]; x [T, D] -> [T, D] (reference loop; no kernel yet)."""
    return moe_loop_ref(x, lambda e: (gate_up_weight[e], down_weight[e]), topk_weights, topk_ids)


def mla_absorb_query(q_nope: torch.Tensor, kv_b: torch.Tensor, nope_dim: int) -> torch.Tensor:
    """q_nope [B, S, H, N] through W_UK -> q_latent [B, S, H, C]; kv_b [H * (N + V), C] is kv_b_proj's weight."""
    H = q_nope.shape[2]
    if kernel_mode() == "auto" and not q_nope.is_cuda:
        y = cpu_dispatch.mla_heads(q_nope, kv_b, H, 0, nope_dim, transposed=True)
        if y is not None:
            return y
    w_uk = kv_b.view(H, -1, kv_b.shape[-1])[:, :nope_dim]
    return torch.einsum("bshn,hnc->bshc", q_nope, w_uk)


def mla_absorb_value(o_latent: torch.Tensor, kv_b: torch.Tensor, nope_dim: int) -> torch.Tensor:
    """o_latent [B, S, H, C] through W_UV -> [B, S, H, V]; kv_b [H * (N + V), C] is kv_b_proj's weight."""
    H = o_latent.shape[2]
    per_head = kv_b.shape[0] // H
    if kernel_mode() == "auto" and not o_latent.is_cuda:
        y = cpu_dispatch.mla_heads(o_latent, kv_b, H, nope_dim, per_head - nope_dim, transposed=False)
        if y is not None:
            return y
    w_uv = kv_b.view(H, per_head, kv_b.shape[-1])[:, nope_dim:]
    return torch.einsum("bshc,hvc->bshv", o_latent, w_uv)


def mla_attention(q_latent, q_rope, kv_cache, block_table, seq_lens, softmax_scale, kv_scale=None, max_seq_len=None):
    """Absorbed MLA attention of Q query rows over a paged latent cache -> [Q, H, C]; see mla_decode_ref.
    max_seq_len: a host-side bound on seq_lens; the kernel then sizes its grid without a host sync."""
    if use_triton(q_latent):
        return mla_decode(q_latent, q_rope, kv_cache, block_table, seq_lens, softmax_scale, kv_scale,
                          max_seq_len=max_seq_len)
    if kernel_mode() == "auto" and cpu_dispatch.attention_ok(q_latent, kv_cache, kv_scale):
        return cpu_kernels.mla_decode(q_latent, q_rope, kv_cache, block_table, seq_lens, softmax_scale)
    return mla_decode_ref(q_latent, q_rope, kv_cache, block_table, seq_lens, softmax_scale, kv_scale)


def flash_attention_ok(q: torch.Tensor) -> bool:
    """Whether prefill attention on q runs flash_attention_tile: CPU inference in auto mode. Measured on
    the 2-core Zen 4 box (16 heads, width 192, 2,048 queries over 4,096 keys, masked): 134 GFLOP/s in
    bf16, 127 in float32, where attend_naive's float32 einsums and softmax ops run ~50."""
    return (q.device.type == "cpu" and kernel_mode() == "auto" and not (torch.is_grad_enabled() and q.requires_grad)
            and hasattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu"))


def flash_attention_tile(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, mask: torch.Tensor | None,
                         scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """softmax(scale q k^T + mask) v and its log-sum-exp through torch's CPU flash-attention kernel:
    q [B, H, S, E], k and v [B, H, T, E] (one width E), mask additive in q's dtype, broadcast to
    [B, H, S, T] -> ([B, H, S, E] in q's dtype, lse [B, H, S] float32). Rows the mask hides entirely
    come back 0 with an lse of 0, not -inf: the caller knows which they are."""
    return torch.ops.aten._scaled_dot_product_flash_attention_for_cpu(q, k, v, attn_mask=mask, scale=scale)
