"""The attention layer's input side fused for the CPU (csrc/rotary_kv_write.cpp): split the
q/k/v projection, rotate q and k (rotate-half form, as layers/rotary.py), store k and v in
the paged cache, return q.

Eagerly that is ~25 small ops per layer; at one decoded token their fixed costs exceed the
arithmetic. The kernel rounds every product and difference as the eager ops do, so it is
bit-identical to its twin, `rotary_kv_write_reference`.
"""
from __future__ import annotations

import torch

from r1serve.kernels.cpu_extension import cpu_kernels
from r1serve.kernels.paged_attention import write_kv


def _rotate_half(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    # x: (N, heads, D); cos, sin: (N, 1, D/2). The same arithmetic as layers/rotary.apply_rotary.
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1)


def rotary_kv_write_reference(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                              slot_mapping: torch.Tensor, num_heads: int) -> torch.Tensor:
    # qkv: (N, (H + 2 Hkv) D); cos, sin: (N, 1, D/2); kv_cache: (2, num_blocks, bs, Hkv, D) -> q (N, H, D)
    N, (Hkv, D) = qkv.shape[0], kv_cache.shape[-2:]
    q, k, v = qkv.split([num_heads * D, Hkv * D, Hkv * D], dim=-1)
    q, k = _rotate_half(q.view(N, num_heads, D), cos, sin), _rotate_half(k.view(N, Hkv, D), cos, sin)
    write_kv(kv_cache[0], kv_cache[1], k, v.view(N, Hkv, D), slot_mapping)
    return q


def rotary_kv_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, num_heads: int, kernels=None) -> torch.Tensor:
    # The C++ checks shapes, dtypes, contiguity and slot bounds, with messages.
    return (kernels or cpu_kernels()).rotary_kv_write(qkv, cos, sin, kv_cache, slot_mapping, num_heads)
