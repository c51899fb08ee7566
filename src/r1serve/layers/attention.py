"""The attention layer: store this step's K/V in the paged cache, then attend over it."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from r1serve.kernels.paged_attention import write_kv
from r1serve.layers.attention_metadata import AttentionMetadata

# (q (N,H,D), k_cache, v_cache, metadata, scale) -> (N,H,D); chosen by the platform.
AttentionImpl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor]


class PagedAttention(nn.Module):
    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int, impl: AttentionImpl) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.impl = impl

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # q: (N, H, D); k, v: (N, Hkv, D); kv_cache: (2, num_blocks, block_size, Hkv, D)
        k_cache, v_cache = kv_cache[0], kv_cache[1]
        write_kv(k_cache, v_cache, k, v, meta.slot_mapping)
        out = self.impl(q, k_cache, v_cache, meta, self.scale)  # (N, H, D)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
