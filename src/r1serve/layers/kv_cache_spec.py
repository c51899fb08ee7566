"""What a model keeps per token in the paged KV cache; the engine allocates from this.

    K/V attention (Llama, Qwen2):  layer cache (2, num_blocks, block_size, num_kv_heads, head_dim)
    MLA (DeepSeek-V3/R1):          layer cache (1, num_blocks, block_size, kv_lora_rank + qk_rope_head_dim)

MLA keeps one latent vector per token shared by all heads, not per-head K and V: for R1
in bf16 that is 61 layers x 576 values x 2 bytes = 70,272 bytes per token.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class KVCacheSpec:
    num_layers: int
    planes: int  # 2: separate K and V planes; 1: one latent plane
    token_shape: tuple[int, ...]  # per token and plane

    @classmethod
    def key_value(cls, num_layers: int, num_kv_heads: int, head_dim: int) -> KVCacheSpec:
        return cls(num_layers, 2, (num_kv_heads, head_dim))

    @classmethod
    def latent(cls, num_layers: int, latent_dim: int) -> KVCacheSpec:
        return cls(num_layers, 1, (latent_dim,))

    def layer_shape(self, num_blocks: int, block_size: int) -> tuple[int, ...]:
        return (self.planes, num_blocks, block_size, *self.token_shape)

    def bytes_per_token(self, dtype: torch.dtype) -> int:
        return self.num_layers * self.planes * math.prod(self.token_shape) * dtype.itemsize
