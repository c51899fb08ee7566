"""The attention layer: store this step's K/V in the paged cache, then attend over it."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from r1serve.kernels.paged_attention import paged_attention_reference
from r1serve.kernels.rotary_kv_write import rotary_kv_write_reference
from r1serve.kernels.attention_metadata import AttentionMetadata

# (q (N,H,D), k_cache, v_cache, metadata, scale) -> (N,H,D); a platform may swap in a kernel.
AttentionImpl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, AttentionMetadata, float], torch.Tensor]
# (qkv, cos, sin, kv_cache, slot_mapping, num_heads) -> rotated q; a platform may swap in a fused kernel.
RotaryKVWriteImpl = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, int], torch.Tensor]


class RotaryKVWrite(nn.Module):
    """Splits the fused q/k/v projection, applies the rotary embedding to q and k, and
    stores k and v in the paged cache; returns q."""

    kernel_ops = ("rotary_kv_write",)  # what a platform's bind may swap (platforms/base.py)

    def __init__(self, num_heads: int) -> None:
        super().__init__()
        self.num_heads = num_heads
        self.rotary_kv_write: RotaryKVWriteImpl = rotary_kv_write_reference

    def forward(self, qkv: torch.Tensor, rope: tuple[torch.Tensor, torch.Tensor], kv_cache: torch.Tensor,
                meta: AttentionMetadata) -> torch.Tensor:
        # qkv: (N, (H + 2 Hkv) D); rope: cos, sin (N, 1, D/2); kv_cache: (2, num_blocks, block_size, Hkv, D) -> (N, H, D)
        cos, sin = rope
        return self.rotary_kv_write(qkv, cos, sin, kv_cache, meta.slot_mapping, self.num_heads)


class PagedAttention(nn.Module):
    kernel_ops = ("paged_attention",)  # what a platform's bind may swap (platforms/base.py)

    def __init__(self, num_heads: int, num_kv_heads: int, head_dim: int) -> None:
        super().__init__()
        self.num_heads, self.num_kv_heads, self.head_dim = num_heads, num_kv_heads, head_dim
        self.scale = head_dim ** -0.5
        self.paged_attention: AttentionImpl = paged_attention_reference

    def forward(self, q: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q: (N, H, D), this step's keys and values already in kv_cache: (2, num_blocks, block_size, Hkv, D)
        out = self.paged_attention(q, kv_cache[0], kv_cache[1], meta, self.scale)  # (N, H, D)
        return out.reshape(q.shape[0], self.num_heads * self.head_dim)
