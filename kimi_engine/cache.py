"""The MLA latent KV cache: per token and layer, the normed kv_lora_rank latent and the roped shared key.

That is all MLA needs to attend (keys and values are expanded from the latent, or never expanded in
the absorbed form): 576 values per token per layer for Kimi K2 instead of 64 heads x (192 + 128).
"""

from __future__ import annotations

import torch

from .config import ModelConfig


class LatentCache:
    """kv [L, B, T, C + R]: latents kv[..., :C] and roped keys kv[..., C:] for B sequences of up to T tokens.

    Allocated for the sequences in use (B) and the longest they may grow (T). All B sequences
    advance together: tokens [start_pos, start_pos + S) are written at once for every row.
    """

    def __init__(self, config: ModelConfig, batch_size: int, max_seq_len: int,
                 device: torch.device | str | None = None, dtype: torch.dtype = torch.bfloat16):
        self.kv_lora_rank = config.kv_lora_rank
        self.max_seq_len = max_seq_len
        width = config.kv_lora_rank + config.qk_rope_head_dim
        self.kv = torch.zeros(config.num_hidden_layers, batch_size, max_seq_len, width, device=device, dtype=dtype)

    @property
    def batch_size(self) -> int:
        return self.kv.shape[1]

    def write(self, layer: int, start_pos: int, latent: torch.Tensor, k_rope: torch.Tensor) -> None:
        """Store latent [B, S, C] and k_rope [B, S, R] at positions start_pos .. start_pos + S - 1."""
        end = start_pos + latent.shape[1]
        if end > self.max_seq_len:
            raise ValueError(f"cache holds {self.max_seq_len} tokens; writing up to position {end}")
        self.kv[layer, :, start_pos:end, : self.kv_lora_rank] = latent
        self.kv[layer, :, start_pos:end, self.kv_lora_rank :] = k_rope

    def read(self, layer: int, end: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Views of the first `end` positions: latent [B, end, C], k_rope [B, end, R]."""
        kv = self.kv[layer, :, :end]
        return kv[..., : self.kv_lora_rank], kv[..., self.kv_lora_rank :]
