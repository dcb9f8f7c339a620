"""A whole CPU decode step in one call to the CPU kernels (kt_decode_step in kernels/cpu_kernels.cpp).

A decode step of the module path calls ~14 kernels per layer from Python, with the views, checks
and small torch ops between them. Each kernel streams megabytes of weights, which evicts the
interpreter's working set from the caches, so that Python runs 3-7x slower than it does warm: on
the 6-layer benchmark model (benchmarks/bench_cpu.py) ~10 ms of a ~37 ms step. kt_decode_step runs
the same kernels in the same order, rounding each result to the activation dtype where the
modules round it: the same logits and the same cache contents, bit for bit (tests/test_cpu_step.py),
without the Python between them.

It takes what the kernels take: one new token per sequence, absorbed attention, every dense matrix
bf16 (or float32 holding bf16 values, read through cpu_dispatch's bf16 copies), INT4 routed experts
(bf16 ones have no kernel), norms in the activation dtype, a bf16/float32 cache (not fp8), no tensor
parallelism, no autograd. Anything else, or KIMI_ENGINE_CPU_STEP=0, runs the modules.

The plan (pointers to every layer's weights) is built on the first step and kept on the model; each
step checks that no weight has been replaced or modified since (its identity, storage and version).
"""

from __future__ import annotations

import contextlib
import ctypes
import os
from typing import TYPE_CHECKING

import torch

from . import ops
from .cache import CacheBatch, LatentCache
from .kernels import cpu, cpu_dispatch

if TYPE_CHECKING:
    from .model import Transformer

STEP_ENV = "KIMI_ENGINE_CPU_STEP"   # "0": decode through the modules
# kt_decode_step's phases, in the order of its timings (see phase_timings)
PHASES = ("small ops", "attention projections", "head products", "attention", "router", "routed experts",
          "MLPs", "lm_head")
_timings: torch.Tensor | None = None

_p, _i64 = ctypes.c_void_p, ctypes.c_int64


class KtLayer(ctypes.Structure):
    _fields_ = [(name, _p) for name in ("input_norm", "post_norm", "q_a", "q_a_norm", "q_b", "kv_a", "kv_a_norm",
                                        "kv_b", "o", "gate", "up", "down")] + [("inter", _i64)] + \
               [(name, _p) for name in ("router", "router_bias", "gu_packed", "gu_scale", "dn_packed", "dn_scale")]


class KtModel(ctypes.Structure):
    _fields_ = ([(name, _i64) for name in ("layers", "D", "H", "N", "R", "V", "C", "Lq", "E", "K", "I", "G",
                                            "n_group", "topk_group", "vocab")]
                + [("act_bf16", ctypes.c_int), ("norm_topk", ctypes.c_int)]
                + [(name, ctypes.c_float) for name in ("scaling", "eps", "latent_eps", "softmax_scale")]
                + [("layer", ctypes.POINTER(KtLayer)), ("embed", _p), ("final_norm", _p), ("lm_head", _p)])


class _Key:
    """What changes when a tensor is modified in place (its version: inference tensors have none) or
    given new storage. Read every step over ~15 tensors a layer, after the weights have streamed
    through the caches: one list comprehension of attribute reads each."""

    def __init__(self, tensors: list[torch.Tensor]):
        self.inference = [t for t in tensors if t.is_inference()]
        self.tracked = [t for t in tensors if not t.is_inference()]

    def __call__(self) -> tuple[list, list]:
        return [t.data_ptr() for t in self.inference], [(t.data_ptr(), t._version) for t in self.tracked]


class Unsupported(Exception):
    """Raised while building a plan: the model has something kt_decode_step does not take."""


class Plan:
    """kt_decode_step's view of a model: a KtModel over pointers into its weights (kept alive here)."""

    def __init__(self, model: Transformer):
        self.sources: list[torch.Tensor] = []   # the model's tensors the plan points into (checked each step)
        self.held: list[torch.Tensor] = []      # what the pointers point at: those tensors or bf16/float32 copies
        c = model.config
        embed = model.model.embed_tokens.weight
        self.act_dtype = embed.dtype
        if self.act_dtype not in cpu.ACT_DTYPES:
            raise Unsupported(f"activation dtype {self.act_dtype}")
        layers = (KtLayer * c.num_hidden_layers)()
        dims = dict(I=0, G=0, E=0, K=0)
        for i, block in enumerate(model.model.layers):
            attn, ffn, L = block.self_attn, block.mlp, layers[i]
            L.input_norm, L.post_norm = self._norm(block.input_layernorm), self._norm(block.post_attention_layernorm)
            if hasattr(attn, "q_proj"):
                L.q_b = self._dense(attn.q_proj)
            else:
                L.q_a, L.q_a_norm, L.q_b = self._dense(attn.q_a_proj), self._norm(attn.q_a_layernorm), self._dense(attn.q_b_proj)
            L.kv_a, L.kv_a_norm = self._dense(attn.kv_a_proj_with_mqa), self._norm(attn.kv_a_layernorm)
            L.kv_b, L.o = self._dense(attn.kv_b_proj), self._dense(attn.o_proj)
            mlp = getattr(ffn, "shared_experts", ffn)
            if hasattr(ffn, "gate"):   # MoE
                gate, experts = ffn.gate, ffn.experts
                if not experts.int4:
                    raise Unsupported("bf16 routed experts")
                L.router = self._dense_weight(gate.weight)
                L.router_bias = self._hold(gate.e_score_correction_bias, gate.e_score_correction_bias.float().contiguous())
                G = experts.dim // experts.gate_up_scale.shape[-1]
                if not (cpu.int4_supported(experts.dim, G) and cpu.int4_supported(experts.inter_dim, G)):
                    raise Unsupported(f"INT4 group size {G}")
                L.gu_packed, L.gu_scale, L.dn_packed, L.dn_scale = (
                    self._exact(t, dtype) for t, dtype in ((experts.gate_up_packed, torch.int32),
                                                           (experts.gate_up_scale, torch.bfloat16),
                                                           (experts.down_packed, torch.int32),
                                                           (experts.down_scale, torch.bfloat16)))
                dims = dict(I=experts.inter_dim, G=G, E=experts.n_experts, K=gate.top_k)
            if mlp is not None:
                L.gate, L.up, L.down = (self._dense(p) for p in (mlp.gate_proj, mlp.up_proj, mlp.down_proj))
                L.inter = mlp.gate_proj.out_features
        head = model.lm_head.weight if model.lm_head is not None else embed
        if model.lm_head is not None and model.lm_head.int4:
            raise Unsupported("an INT4 lm_head")
        self.struct = KtModel(
            layers=c.num_hidden_layers, D=c.hidden_size, H=c.num_attention_heads,
            N=c.qk_nope_head_dim, R=c.qk_rope_head_dim, V=c.v_head_dim, C=c.kv_lora_rank, Lq=c.q_lora_rank or 0,
            n_group=c.n_group, topk_group=c.topk_group, vocab=c.vocab_size, act_bf16=self.act_dtype == torch.bfloat16,
            norm_topk=bool(c.norm_topk_prob), scaling=c.routed_scaling_factor, eps=c.rms_norm_eps,
            latent_eps=model.model.layers[0].self_attn.kv_a_layernorm.eps, softmax_scale=c.softmax_scale,
            layer=layers, embed=self._exact(embed, self.act_dtype), final_norm=self._norm(model.model.norm),
            lm_head=self._dense_weight(head), **dims)
        self.layers = layers
        self.state = _Key(self.sources)
        self.key = self.state()

    def _hold(self, source: torch.Tensor, held: torch.Tensor) -> int:
        if source.device.type != "cpu":
            raise Unsupported(f"a weight on {source.device}")
        self.sources.append(source)
        self.held.append(held)
        return held.data_ptr()

    def _exact(self, t: torch.Tensor, dtype: torch.dtype) -> int:
        if t.dtype != dtype or not t.is_contiguous():
            raise Unsupported(f"a {t.dtype} tensor where {dtype} is read")
        return self._hold(t, t)

    def _norm(self, norm) -> int:
        return self._exact(norm.weight, self.act_dtype)

    def _dense_weight(self, w: torch.Tensor) -> int:
        copy = cpu_dispatch.bf16_weight(w) if w.device.type == "cpu" else None
        if copy is None:
            raise Unsupported(f"a {w.dtype} weight that is not exactly bf16")
        return self._hold(w, copy)

    def _dense(self, linear) -> int:
        if linear.int4:
            raise Unsupported("an INT4 dense matrix")
        return self._dense_weight(linear.weight)

    def valid(self) -> bool:
        return self.state() == self.key and not (torch.is_grad_enabled() and any(t.requires_grad for t in self.sources))

    def run(self, model: Transformer, tokens: torch.Tensor, batch: CacheBatch, cache: LatentCache) -> torch.Tensor:
        """logits [B, 1, vocab] of the decode step, the new tokens' latents written into the cache."""
        B = tokens.shape[0]
        # [B, 1] and [B] alike: the kernel reads B contiguous values. (Conversions only where needed:
        # each torch call here costs microseconds, the weights having just streamed through the caches.)
        ids, positions, slots, table, lens = (
            t if t.dtype == dtype and t.is_contiguous() else t.to(dtype).contiguous()
            for t, dtype in ((tokens, torch.int64), (batch.positions, torch.int64), (batch.slots, torch.int64),
                             (batch.block_table, torch.int32), (batch.seq_lens, torch.int32)))
        # The kernel trusts its indices; out-of-range ones raise here, as the modules' lookups would.
        for name, t, end in (("token ids", ids, model.config.vocab_size), ("positions", positions, model.rope_cos.shape[0]),
                             ("cache slots", slots, cache.num_blocks * cache.block_size)):
            values = t.view(-1).tolist()
            if values and (min(values) < 0 or max(values) >= end):
                raise IndexError(f"{name} must be in [0, {end}), got {values}")
        pools = (ctypes.c_void_p * len(cache.kv))(*(p.data_ptr() for p in cache.kv))
        cos, sin = model.rope_cos, model.rope_sin
        if not (cos.is_contiguous() and sin.is_contiguous()):
            cos, sin = cos.contiguous(), sin.contiguous()
        logits = torch.empty(B, model.config.vocab_size, dtype=self.act_dtype)
        cpu.library().kt_decode_step(ctypes.byref(self.struct), B, ids.data_ptr(), positions.data_ptr(),
                                     slots.data_ptr(), cos.data_ptr(), sin.data_ptr(), pools,
                                     cache.kv[0].dtype == torch.bfloat16, cache.block_size, table.data_ptr(),
                                     table.shape[1], lens.data_ptr(), logits.data_ptr(),
                                     None if _timings is None else _timings.data_ptr())
        return logits.unsqueeze(1)


@contextlib.contextmanager
def phase_timings():
    """Within the block, each decode step adds its phases' seconds to the yielded dict {phase: seconds}
    (see PHASES), filled in when the block ends."""
    global _timings
    seconds, _timings = {}, torch.zeros(len(PHASES), dtype=torch.float64)
    try:
        yield seconds
    finally:
        seconds.update(zip(PHASES, _timings.tolist()))
        _timings = None


def enabled() -> bool:
    return os.environ.get(STEP_ENV, "1").strip() != "0"


def plan_for(model: Transformer, tokens: torch.Tensor, batch: CacheBatch | None, cache: LatentCache | None,
             absorb: bool | None) -> Plan | None:
    """The model's plan if kt_decode_step takes this forward pass, else None (run the modules)."""
    if (cache is None or batch is None or absorb is False or tokens.dim() != 2 or tokens.shape[1] != 1
            or tokens.device.type != "cpu" or model.parallel is not None or not enabled()
            or ops.kernel_mode() != "auto" or not cpu.available()):
        return None
    if (cache.fp8 or cache.kv[0].dtype not in cpu.ACT_DTYPES or cache.block_size > cpu.MLA_MAX_BLOCK
            or cache.kv[0].device.type != "cpu" or len(cache.kv) != model.config.num_hidden_layers
            or any(p.dtype != cache.kv[0].dtype or not p.is_contiguous() for p in cache.kv)):
        return None
    plan = getattr(model, "_cpu_step_plan", None)
    if plan is not None and plan.valid():
        return plan
    try:
        plan = Plan(model)
    except Unsupported:   # tried again next step: cheap next to the module path it falls back to
        return None
    if not plan.valid():   # autograd wants these weights' gradients
        return None
    model._cpu_step_plan = plan
    return plan
