"""Kimi K2 / DeepSeek-V3 in plain PyTorch, in the paper's order:
RMSNorm, YaRN rope, MLA, MLP, Gate, Experts, MoE, Block, Transformer.

Module names mirror the checkpoint keys (`model.layers.3.self_attn.kv_a_proj_with_mqa.weight`), so
loading is a lookup. The hot ops (INT4 matmul, routing, experts, latent attention) go through `ops`.

Shape legend:
    B batch, S new tokens, T cached positions, D hidden size, H heads,
    N qk_nope_head_dim, R qk_rope_head_dim, V v_head_dim, C kv_lora_rank,
    E routed experts, K experts per token, I expert intermediate size, G int4 group size
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING

import torch
import torch.nn.functional as F
from torch import nn

from . import cpu_step, ops
from .cache import CacheBatch, LatentCache
from .config import ModelConfig
from .int4 import PACK_FACTOR, dequantize

if TYPE_CHECKING:
    from .parallel import Parallel


KV_TILE = 4096  # context positions expanded at a time by the naive (prefill) attention
# q_a_layernorm and kv_a_layernorm (the two latent norms) use a fixed epsilon, not config.rms_norm_eps:
# DeepSeek's inference code, HF transformers' DeepseekV3 and the modeling code shipped with
# DeepSeek-V3-family checkpoints build them with the RMSNorm default 1e-6, and use rms_norm_eps only for
# the input, post-attention and final norms. The checkpoints were trained that way; with Kimi's
# rms_norm_eps = 1e-5 the config's value would move every activation by ~1e-5 relative and can flip a
# near-tied expert choice on long inputs.
LATENT_NORM_EPS = 1e-6


def _weight(*shape: int, dtype: torch.dtype | None = None) -> nn.Parameter:
    """An inference-only weight; built on the meta device and replaced by the loader."""
    return nn.Parameter(torch.empty(*shape, dtype=dtype), requires_grad=False)


class Linear(nn.Module):
    """y = x W^T with W stored as in the checkpoint: `weight` [out, in] (bf16), or after
    `make_int4()`, `weight_packed` int32 [out, in/8] + `weight_scale` [out, in/G] (see int4.py).

    With a `parallel` group (see distributed.py), shard="column" holds this rank's block of the
    outputs, shard="row" its block of the inputs, all-reducing the partial products unless
    reduce=False (the caller combines them). `shard_dim` says which weight dim is split, for the loader.
    """

    def __init__(self, in_features: int, out_features: int, parallel: Parallel | None = None,
                 shard: str | None = None, reduce: bool = True):
        super().__init__()
        self.parallel, self.reduce = parallel, reduce
        self.shard_dim = None if parallel is None else {None: None, "column": 0, "row": 1}[shard]
        if self.shard_dim == 0:
            out_features = parallel.split(out_features, "out_features")
        elif self.shard_dim == 1:
            in_features = parallel.split(in_features, "in_features")
        self.in_features, self.out_features = in_features, out_features
        self.weight = _weight(out_features, in_features)
        self.int4 = False

    def make_int4(self, group_size: int) -> None:
        if self.in_features % group_size:
            split = f" (this rank's 1/{self.parallel.world_size} of the inputs)" if self.shard_dim == 1 else ""
            raise ValueError(f"in_features {self.in_features}{split} is not a multiple of the group size {group_size}")
        del self.weight
        self.weight_packed = _weight(self.out_features, self.in_features // PACK_FACTOR, dtype=torch.int32)
        self.weight_scale = _weight(self.out_features, self.in_features // group_size, dtype=torch.bfloat16)
        self.int4 = True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = ops.int4_linear(x, self.weight_packed, self.weight_scale) if self.int4 else ops.linear(x, self.weight)
        if self.shard_dim == 1 and self.reduce:   # row-split: each rank summed over its inputs only
            y = self.parallel.all_reduce(y)
        return y

    def dense_weight(self, dtype: torch.dtype) -> torch.Tensor:
        """W [out, in] in `dtype` (dequantized if stored as INT4)."""
        if self.int4:
            return dequantize(self.weight_packed, self.weight_scale, dtype)
        return self.weight.to(dtype)


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = _weight(dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return ops.rms_norm(x, self.weight, self.eps)


class Embedding(nn.Module):
    """Token embeddings `weight` [vocab, D]. Vocabulary-parallel: each rank holds a block of rows,
    looks up the tokens in it (zeros for the others) and an all-reduce sums the blocks' rows."""

    def __init__(self, vocab_size: int, dim: int, parallel: Parallel | None = None):
        super().__init__()
        self.parallel, self.first_token, self.shard_dim = parallel, 0, None
        if parallel is not None:
            held = parallel.part(vocab_size, "vocab_size")
            self.first_token, vocab_size, self.shard_dim = held.start, held.stop - held.start, 0
        self.weight = _weight(vocab_size, dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.parallel is None:
            return F.embedding(tokens, self.weight)
        local = tokens - self.first_token
        mine = (local >= 0) & (local < self.weight.shape[0])
        h = F.embedding(local.where(mine, 0), self.weight).masked_fill(~mine[..., None], 0)
        return self.parallel.all_reduce(h)


# ------------------------------------------------------------------------------------------ rope
def rope_tables(config: ModelConfig, num_positions: int) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin [P, R/2] float32 for positions 0 .. P-1: YaRN as in DeepSeek-V3 when rope_scaling is set.

    YaRN keeps high frequencies (more than beta_fast rotations over the original context) as they
    are, divides low ones (fewer than beta_slow) by `factor`, and ramps linearly in between; cos and
    sin carry the attention factor mscale(factor, mscale) / mscale(factor, mscale_all_dim).
    """
    dim, base = config.qk_rope_head_dim, config.rope_theta
    inv_freq = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.float32) / dim))   # [R/2]
    attention_factor = 1.0
    rs = config.rope_scaling
    if rs is not None:
        factor, original = rs["factor"], rs["original_max_position_embeddings"]
        beta_fast, beta_slow = rs.get("beta_fast", 32), rs.get("beta_slow", 1)

        def correction_dim(rotations: float) -> float:  # the dim whose wavelength fits `rotations` times
            return dim * math.log(original / (rotations * 2 * math.pi)) / (2 * math.log(base))

        low = max(math.floor(correction_dim(beta_fast)), 0)
        high = min(math.ceil(correction_dim(beta_slow)), dim - 1)
        if low == high:
            high += 0.001  # beta_fast == beta_slow (1.0 in Kimi K2) would divide by zero
        ramp = ((torch.arange(dim // 2, dtype=torch.float32) - low) / (high - low)).clamp(0, 1)
        inv_freq = inv_freq / factor * ramp + inv_freq * (1 - ramp)

        def mscale(m: float) -> float:
            return 1.0 if factor <= 1 else 0.1 * m * math.log(factor) + 1.0
        attention_factor = mscale(rs.get("mscale", 1)) / mscale(rs.get("mscale_all_dim", 0))
    freqs = torch.outer(torch.arange(num_positions, dtype=torch.float32), inv_freq)   # [P, R/2]
    return freqs.cos() * attention_factor, freqs.sin() * attention_factor


# ------------------------------------------------------------------------------------------ MLA
class MLA(nn.Module):
    """Multi-head latent attention. Keys and values live in the cache as a C-dim latent plus one
    R-dim roped key shared by all heads.

    naive (prefill): expand the cached latents through kv_b_proj into per-head keys and values.
    absorbed (decode): fold W_UK into the queries and W_UV into the output, attending over the latent
    directly; the same math with the matmuls reassociated, reading C + R values per cached token.
    """

    def __init__(self, config: ModelConfig, parallel: Parallel | None = None):
        super().__init__()
        c = config
        # Tensor parallel: this rank's heads only (q_b/kv_b column-split by head, o_proj row-split).
        # q_a and kv_a stay whole: the latent they make is shared by every head (see distributed.py).
        self.n_heads = c.num_attention_heads if parallel is None else parallel.split(c.num_attention_heads,
                                                                                     "num_attention_heads")
        self.kv_lora_rank = c.kv_lora_rank
        self.nope_dim, self.rope_dim, self.v_dim = c.qk_nope_head_dim, c.qk_rope_head_dim, c.v_head_dim
        self.softmax_scale = c.softmax_scale
        q_out = c.num_attention_heads * c.qk_head_dim
        if c.q_lora_rank is None:
            self.q_proj = Linear(c.hidden_size, q_out, parallel, "column")
        else:
            self.q_a_proj = Linear(c.hidden_size, c.q_lora_rank)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, LATENT_NORM_EPS)
            self.q_b_proj = Linear(c.q_lora_rank, q_out, parallel, "column")
        self.kv_a_proj_with_mqa = Linear(c.hidden_size, c.kv_lora_rank + c.qk_rope_head_dim)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, LATENT_NORM_EPS)
        self.kv_b_proj = Linear(c.kv_lora_rank, c.num_attention_heads * (c.qk_nope_head_dim + c.v_head_dim),
                                parallel, "column")
        self.o_proj = Linear(c.num_attention_heads * c.v_head_dim, c.hidden_size, parallel, "row")

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, positions: torch.Tensor,
                cache: LatentCache | None, batch: CacheBatch | None, layer: int, absorb: bool) -> torch.Tensor:
        """x [B, S, D] at positions [B, S] -> [B, S, D]. With a cache, the new tokens' latents are
        written to it and attention covers everything cached; without one (training, scoring),
        attention covers these S tokens only."""
        B, S, _ = x.shape
        H, N, R, V, C = self.n_heads, self.nope_dim, self.rope_dim, self.v_dim, self.kv_lora_rank
        if hasattr(self, "q_proj"):
            q = self.q_proj(x)
        else:
            q = self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))
        q_nope, q_rope = q.view(B, S, H, N + R).split([N, R], dim=-1)   # [B, S, H, N], [B, S, H, R]
        q_rope = ops.rope(q_rope, cos, sin)
        latent, k_rope = self.kv_a_proj_with_mqa(x).split([C, R], dim=-1)  # [B, S, C], [B, S, R]
        latent, k_rope = self.kv_a_layernorm(latent), ops.rope(k_rope, cos, sin)
        if cache is None:
            o = self.attend_naive(q_nope, q_rope, latent, k_rope, positions)
            return self.o_proj(o.flatten(2))
        cache.write(layer, batch, latent, k_rope)

        if absorb:
            kv_b = self.kv_b_proj.dense_weight(x.dtype)                          # [H * (N + V), C]
            q_latent = ops.mla_absorb_query(q_nope, kv_b, N)                     # [B, S, H, C]
            # One row per query token, each with its own causal length, all reading its sequence's blocks.
            # Decode skips repeat_interleave, whose CUDA path may read back to the host (CUDA graphs forbid it).
            table = batch.block_table if S == 1 else batch.block_table.repeat_interleave(S, dim=0)
            o_latent = ops.mla_attention(
                q_latent.flatten(0, 1), q_rope.flatten(0, 1), cache.kv[layer], table, (positions + 1).flatten().int(),
                self.softmax_scale, None if cache.kv_scale is None else cache.kv_scale[layer], batch.max_seq_len)
            o = ops.mla_absorb_value(o_latent.view(B, S, H, C), kv_b, N)         # [B, S, H, V]
        else:
            o = self.attend_naive(q_nope, q_rope, *cache.gather(layer, batch), positions)
        return self.o_proj(o.flatten(2))

    def attend_naive(self, q_nope, q_rope, latent, k_rope, positions, kv_tile: int = KV_TILE):
        """Expanded-KV attention of q [B, S, H, N|R] over the cached latent [B, T, C] and k_rope [B, T, R].

        Query s of row b sees positions <= positions[b, s]. Keys and values are expanded through
        kv_b_proj `kv_tile` positions at a time, merged by online softmax (float32), so memory stays
        O(S x kv_tile) however long the context.
        """
        if ops.flash_attention_ok(q_nope):
            return self._attend_flash(q_nope, q_rope, latent, k_rope, positions, kv_tile)
        (B, S, H, _), dtype = q_nope.shape, q_nope.dtype
        N, V = self.nope_dim, self.v_dim
        # float32 scores: the nope and rope halves are summed before any rounding.
        q_nope, q_rope = q_nope.float() * self.softmax_scale, q_rope.float() * self.softmax_scale
        first_query = int(positions.min())  # tiles wholly before it need no causal mask
        m = q_nope.new_full((B, S, H), float("-inf"))   # running max
        l = torch.zeros_like(m)                         # running sum of exp
        acc = q_nope.new_zeros((B, S, H, V))
        for t0 in range(0, latent.shape[1], kv_tile):
            k_nope, v = self.kv_b_proj(latent[:, t0:t0 + kv_tile]).unflatten(-1, (H, N + V)).split([N, V], dim=-1)
            scores = torch.einsum("bshn,bthn->bsht", q_nope, k_nope.float())
            scores += torch.einsum("bshr,btr->bsht", q_rope, k_rope[:, t0:t0 + kv_tile].float())
            if t0 + k_nope.shape[1] > first_query + 1:
                t = torch.arange(t0, t0 + k_nope.shape[1], device=scores.device)
                scores.masked_fill_(t.view(1, 1, 1, -1) > positions[:, :, None, None], float("-inf"))
            # Every query sees position 0, so m_new is finite from the first tile on. The max is only a
            # shift the result does not depend on: detached, so backward needs no copy of `scores`
            # (amax would save it, and the in-place sub_/exp_ below overwrite it).
            m_new = torch.maximum(m, scores.detach().amax(-1))
            p = scores.sub_(m_new[..., None]).exp_()
            correction = torch.exp(m - m_new)
            l = l * correction + p.sum(-1)
            acc = acc * correction[..., None] + torch.einsum("bsht,bthv->bshv", p, v.float())
            m = m_new
        return (acc / l[..., None]).to(dtype)

    def _attend_flash(self, q_nope, q_rope, latent, k_rope, positions, kv_tile: int):
        """attend_naive through torch's CPU flash-attention kernel (ops.flash_attention_tile), one
        expanded KV tile at a time, merged by log-sum-exp in float32. Its GEMMs take the model dtype
        with float32 sums; in bf16 it rounds the softmax weights to bf16 before they meet the values,
        as the GPU kernels do. One head width for q, k and v: [q_nope | q_rope] against
        [k_nope | k_rope], v zero-padded to it."""
        (B, S, H, N), R, V = q_nope.shape, self.rope_dim, self.v_dim
        E = max(N + R, V)
        q = F.pad(torch.cat([q_nope, q_rope], -1), (0, E - N - R)).transpose(1, 2)      # [B, H, S, E]
        first, last = int(positions.min()), int(positions.max())
        out = lse = None
        for t0 in range(0, min(latent.shape[1], last + 1), kv_tile):   # tiles past every query: skipped
            t1 = min(t0 + kv_tile, latent.shape[1], last + 1)
            k_nope, v = self.kv_b_proj(latent[:, t0:t1]).unflatten(-1, (H, N + V)).split([N, V], dim=-1)
            k = torch.cat([k_nope, k_rope[:, t0:t1, None, :].expand(-1, -1, H, -1)], -1)
            k, v = F.pad(k, (0, E - N - R)).transpose(1, 2), F.pad(v, (0, E - V)).transpose(1, 2)
            mask = None
            if t1 - 1 > first:   # some query does not see the whole tile
                hidden = torch.arange(t0, t1, device=q.device) > positions[:, None, :, None]   # [B, 1, S, t]
                mask = torch.zeros(hidden.shape, dtype=q.dtype, device=q.device).masked_fill_(hidden, float("-inf"))
            o, l = ops.flash_attention_tile(q, k, v, mask, self.softmax_scale)
            if t0 > first:   # queries before the tile see none of it: weight 0 (the kernel says lse 0)
                l = l.masked_fill(positions[:, None, :] < t0, float("-inf"))
            if out is None:
                out, lse = o, l
            else:
                new = torch.logaddexp(lse, l)
                out = out * (lse - new).exp()[..., None] + o.float() * (l - new).exp()[..., None]
                lse = new
        return out[..., :V].transpose(1, 2).to(q_nope.dtype)


# ------------------------------------------------------------------------------------------ FFN
class MLP(nn.Module):
    """SiLU-gated feed-forward: the dense layers and the shared experts. Tensor parallel: gate/up
    column-split, down row-split (reduce=False leaves its partial sum to the caller, as MoE does)."""

    def __init__(self, dim: int, inter_dim: int, parallel: Parallel | None = None, reduce: bool = True):
        super().__init__()
        self.gate_proj = Linear(dim, inter_dim, parallel, "column")
        self.up_proj = Linear(dim, inter_dim, parallel, "column")
        self.down_proj = Linear(inter_dim, dim, parallel, "row", reduce=reduce)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        projs = (self.gate_proj, self.up_proj, self.down_proj)
        if self.down_proj.parallel is None and not any(p.int4 for p in projs):   # one fused op (CPU kernels)
            return ops.mlp(x, *(p.weight for p in projs))
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class Gate(nn.Module):
    """The noaux_tc router: sigmoid scores, top-k on score + correction bias, unbiased weights."""

    def __init__(self, config: ModelConfig):
        super().__init__()
        c = config
        self.top_k, self.n_group, self.topk_group = c.num_experts_per_tok, c.n_group, c.topk_group
        self.norm_topk_prob, self.routed_scaling_factor = c.norm_topk_prob, c.routed_scaling_factor
        self.weight = _weight(c.n_routed_experts, c.hidden_size)
        self.e_score_correction_bias = _weight(c.n_routed_experts, dtype=torch.float32)

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """x [T, D] -> weights [T, K] float32, expert ids [T, K] int32."""
        logits = ops.router_logits(x, self.weight)                        # [T, E] float32
        return ops.route(logits, self.e_score_correction_bias, self.top_k, self.n_group, self.topk_group,
                         self.norm_topk_prob, self.routed_scaling_factor)


class Experts(nn.Module):
    """The routed experts of one layer, stacked so kernels index them by expert id.

    bf16: gate_up_weight [E, 2I, D] (rows :I are gate_proj, I: are up_proj), down_weight [E, D, I].
    INT4 (after make_int4): gate_up_packed [E, 2I, D/8] + gate_up_scale [E, 2I, D/G],
    down_packed [E, D, I/8] + down_scale [E, D, I/G], each expert in the checkpoint's own layout.
    Expert parallel: this rank stacks only experts [first_expert, first_expert + n_experts).
    """

    def __init__(self, n_experts: int, dim: int, inter_dim: int, parallel: Parallel | None = None):
        super().__init__()
        self.parallel, self.first_expert = parallel, 0
        if parallel is not None:
            held = parallel.part(n_experts, "n_routed_experts")
            self.first_expert, n_experts = held.start, held.stop - held.start
        self.n_experts, self.dim, self.inter_dim = n_experts, dim, inter_dim
        self.gate_up_weight = _weight(n_experts, 2 * inter_dim, dim)
        self.down_weight = _weight(n_experts, dim, inter_dim)
        self.int4 = False

    def make_int4(self, group_size: int) -> None:
        E, D, I = self.n_experts, self.dim, self.inter_dim
        if D % group_size or I % group_size:
            raise ValueError(f"expert dims {D} and {I} must be multiples of the group size {group_size}")
        del self.gate_up_weight, self.down_weight
        self.gate_up_packed = _weight(E, 2 * I, D // PACK_FACTOR, dtype=torch.int32)
        self.gate_up_scale = _weight(E, 2 * I, D // group_size, dtype=torch.bfloat16)
        self.down_packed = _weight(E, D, I // PACK_FACTOR, dtype=torch.int32)
        self.down_scale = _weight(E, D, I // group_size, dtype=torch.bfloat16)
        self.int4 = True

    def forward(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        if self.parallel is not None:   # global -> local expert ids; -1 (skipped) for other ranks' experts
            ids = ids - self.first_expert
            ids = ids.masked_fill((ids < 0) | (ids >= self.n_experts), -1)
        if self.int4:
            return ops.moe_int4(x, self.gate_up_packed, self.gate_up_scale, self.down_packed, self.down_scale,
                                weights, ids)
        return ops.moe_dense(x, self.gate_up_weight, self.down_weight, weights, ids)


class MoE(nn.Module):
    def __init__(self, config: ModelConfig, parallel: Parallel | None = None):
        super().__init__()
        c = config
        self.parallel = parallel
        self.gate = Gate(c)   # replicated: every rank routes every token
        self.experts = Experts(c.n_routed_experts, c.hidden_size, c.moe_intermediate_size, parallel)
        self.shared_experts = (MLP(c.hidden_size, c.moe_intermediate_size * c.n_shared_experts, parallel, reduce=False)
                               if c.n_shared_experts else None)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        flat = x.view(-1, x.shape[-1])                                   # [B*S, D]
        weights, ids = self.gate(flat)
        y = self.experts(flat, weights, ids).view_as(x)
        y = y if self.shared_experts is None else y + self.shared_experts(x)
        # Parallel: this rank's experts plus its slice of the shared expert, one all-reduce for both.
        return y if self.parallel is None else self.parallel.all_reduce(y)


# ------------------------------------------------------------------------------------------ model
class Block(nn.Module):
    def __init__(self, config: ModelConfig, layer: int, parallel: Parallel | None = None):
        super().__init__()
        self.layer = layer
        self.input_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.self_attn = MLA(config, parallel)
        self.post_attention_layernorm = RMSNorm(config.hidden_size, config.rms_norm_eps)
        self.mlp = (MoE(config, parallel) if config.is_moe_layer(layer)
                    else MLP(config.hidden_size, config.intermediate_size, parallel))

    def forward(self, x, cos, sin, positions, cache, batch, absorb):
        x = x + self.self_attn(self.input_layernorm(x), cos, sin, positions, cache, batch, self.layer, absorb)
        return x + self.mlp(self.post_attention_layernorm(x))


class Transformer(nn.Module):
    """The causal LM: `model.embed_tokens`, `model.layers`, `model.norm`, `lm_head`, as in the checkpoint.

    Built as bf16 everywhere; `apply_quantization_layout` then turns the Linear modules that the
    checkpoint's quantization_config covers into INT4 ones. With `parallel` (world_size > 1), one
    rank's shard of the model: see distributed.py.
    """

    def __init__(self, config: ModelConfig, parallel: Parallel | None = None):
        super().__init__()
        self.config = config
        self.parallel = parallel = parallel if parallel is not None and parallel.world_size > 1 else None
        self.model = nn.ModuleDict(dict(
            embed_tokens=Embedding(config.vocab_size, config.hidden_size, parallel),
            layers=nn.ModuleList(Block(config, i, parallel) for i in range(config.num_hidden_layers)),
            norm=RMSNorm(config.hidden_size, config.rms_norm_eps),
        ))
        self.lm_head = (None if config.tie_word_embeddings
                        else Linear(config.hidden_size, config.vocab_size, parallel, "column"))
        self.apply_quantization_layout()
        self.reset_rope()

    def apply_quantization_layout(self) -> None:
        quant = self.config.quant
        if quant is None:
            return
        for name, module in self.named_modules():
            if isinstance(module, Linear) and quant.is_quantized(name):
                try:
                    module.make_int4(quant.group_size)
                except ValueError as e:
                    raise ValueError(f"{name}: {e}") from None
            elif isinstance(module, Experts):
                experts = range(module.first_expert, module.first_expert + module.n_experts)
                flags = {quant.is_quantized(f"{name}.{e}.{p}_proj") for e in experts for p in ("gate", "up", "down")}
                if len(flags) > 1:
                    raise ValueError(f"quantization_config quantizes only some of {name}.*: mixed experts are not supported")
                if flags.pop():
                    module.make_int4(quant.group_size)

    def reset_rope(self, device: torch.device | str | None = None) -> None:
        """(Re)build the rope tables for every position up to max_position_embeddings."""
        cos, sin = rope_tables(self.config, self.config.max_position_embeddings)
        self.register_buffer("rope_cos", cos.to(device), persistent=False)
        self.register_buffer("rope_sin", sin.to(device), persistent=False)

    def forward(self, tokens: torch.Tensor, batch: CacheBatch | None = None, cache: LatentCache | None = None,
                absorb: bool | None = None, last_only: bool = False) -> torch.Tensor:
        """tokens [B, S] -> logits [B, S, vocab] (or [B, 1, vocab] with last_only) in the model dtype.

        With a cache: the tokens sit at batch.positions and their latents are written into `cache`
        (see LatentCache.prepare). Without one: positions 0 .. S-1, attending only among themselves
        (training and scoring; differentiable). absorb: attention form; default naive for prompts
        (S > 1), absorbed for single-token decode.
        """
        with ops.decode_threads(tokens):
            return self._forward(tokens, batch, cache, absorb, last_only)

    def _forward(self, tokens, batch, cache, absorb, last_only) -> torch.Tensor:
        plan = cpu_step.plan_for(self, tokens, batch, cache, absorb)
        if plan is not None:   # a CPU decode step: the whole step in one kernel call
            return plan.run(self, tokens, batch, cache)
        B, S = tokens.shape
        if cache is None:
            positions, absorb = torch.arange(S, device=tokens.device).expand(B, S), False
        else:
            positions = batch.positions
            absorb = S == 1 if absorb is None else absorb
        cos, sin = self.rope_cos[positions], self.rope_sin[positions]   # [B, S, R/2]
        h = self.model.embed_tokens(tokens)                              # [B, S, D]
        for block in self.model.layers:
            h = block(h, cos, sin, positions, cache, batch, absorb)
        h = self.model.norm(h[:, -1:] if last_only else h)
        logits = ops.linear(h, self.model.embed_tokens.weight) if self.lm_head is None else self.lm_head(h)
        # Vocabulary-parallel: each rank has the logits of its block of the vocabulary.
        return logits if self.parallel is None else self.parallel.all_gather(logits)
