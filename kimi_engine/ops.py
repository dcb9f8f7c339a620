"""One function per hot op. The model calls these; each picks an implementation for its inputs.

KIMI_ENGINE_KERNELS chooses, read at every call (so tests can monkeypatch it):
    auto    (default) the Triton kernel for CUDA tensors; on the CPU the CPU kernels (kernels/cpu.py:
            bf16 and INT4 matmuls, the fused MLP and MoE, float32 arithmetic) where they built and take
            the shapes, else torch's INT4 kernel for bf16 INT4 matmuls (cpu_int4.py), else the reference
    triton  always the kernel; on CPU tensors that needs TRITON_INTERPRET=1 set before triton is imported
    torch   always the reference
bf16 experts have no kernel yet and run their reference under every setting; bf16 matmuls go to
cuBLAS through F.linear.
"""

from __future__ import annotations

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

    bf16/fp16 products are exact in float32, so on CUDA a float32-output GEMM on the stored operands
    gives the same sums (up to their order) without materializing a float32 copy of the weight every
    step: at Kimi's widths that copy is 11 MB written and read again per MoE layer per decode step.
    """
    if _MM_OUT_DTYPE and x.is_cuda and x.dtype == weight.dtype and x.dtype in (torch.bfloat16, torch.float16):
        return torch.mm(x, weight.t(), out_dtype=torch.float32)
    return F.linear(x.float(), weight.float())


def route(logits: torch.Tensor, bias: torch.Tensor | None, top_k: int, n_group: int, topk_group: int,
          norm_topk_prob: bool, routed_scaling_factor: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Router logits [T, E] -> (weights [T, K] float32, expert ids [T, K] int32); see route_ref."""
    fn = route_kernel if use_triton(logits) else route_ref
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


def mla_attention(q_latent, q_rope, kv_cache, block_table, seq_lens, softmax_scale, kv_scale=None, max_seq_len=None):
    """Absorbed MLA attention of Q query rows over a paged latent cache -> [Q, H, C]; see mla_decode_ref.
    max_seq_len: a host-side bound on seq_lens; the kernel then sizes its grid without a host sync."""
    if use_triton(q_latent):
        return mla_decode(q_latent, q_rope, kv_cache, block_table, seq_lens, softmax_scale, kv_scale,
                          max_seq_len=max_seq_len)
    return mla_decode_ref(q_latent, q_rope, kv_cache, block_table, seq_lens, softmax_scale, kv_scale)
