"""Wrapper of the hand-written CPU decode attention (csrc/paged_decode_attention.cpp).

Twin: kernels.paged_attention.paged_attention_reference.
"""
from __future__ import annotations

import torch

from r1serve.kernels.cpu_extension import cpu_kernels


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float,
                           kernels=None) -> torch.Tensor:
    # q: (B, H, D); caches: (num_blocks, block_size, Hkv, D); block_tables: (B, max_blocks) int64;
    # seq_lens: (B,) int64 -> (B, H, D)
    assert q.dim() == 3 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (q.shape, k_cache.shape)
    assert q.shape[2] == k_cache.shape[3] and q.shape[1] % k_cache.shape[2] == 0, (q.shape, k_cache.shape)
    assert q.dtype == k_cache.dtype == v_cache.dtype and q.dtype in (torch.float32, torch.bfloat16), q.dtype
    assert block_tables.dtype == seq_lens.dtype == torch.int64 and block_tables.shape[0] == q.shape[0] == seq_lens.shape[0]
    assert q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous()
    assert block_tables.is_contiguous() and seq_lens.is_contiguous()
    return (kernels or cpu_kernels()).paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
