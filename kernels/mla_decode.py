"""Absorbed MLA attention over the latent cache (DeepSeek-V2/V3 "weight absorption")."""

from __future__ import annotations

import torch


def mla_decode_ref(
    q_latent: torch.Tensor,
    q_rope: torch.Tensor,
    kv_latent: torch.Tensor,
    k_rope: torch.Tensor,
    seq_lens: torch.Tensor,
    softmax_scale: float,
) -> torch.Tensor:
    """Attention of S new queries per sequence over its cached latents -> [B, S, H, C] in q's dtype.

    q_latent [B, S, H, C] (q_nope already folded through W_UK), q_rope [B, S, H, R],
    kv_latent [B, T, C], k_rope [B, T, R]: the cache, valid up to seq_lens[b] (which counts the
    S new tokens, already written). Query s of sequence b sits at position seq_lens[b] - S + s and
    sees positions <= its own (causal). Scores and softmax in float32.
    """
    B, S, H, C = q_latent.shape
    T = kv_latent.shape[1]
    scores = (torch.einsum("bshc,btc->bsht", q_latent.float(), kv_latent.float())
              + torch.einsum("bshr,btr->bsht", q_rope.float(), k_rope.float())) * softmax_scale
    q_pos = seq_lens.view(B, 1) - S + torch.arange(S, device=seq_lens.device)       # [B, S]
    visible = torch.arange(T, device=seq_lens.device).view(1, 1, T) <= q_pos[..., None]  # [B, S, T]
    scores = scores.masked_fill(~visible[:, :, None, :], float("-inf"))
    probs = scores.softmax(dim=-1)
    return torch.einsum("bsht,btc->bshc", probs, kv_latent.float()).to(q_latent.dtype)
