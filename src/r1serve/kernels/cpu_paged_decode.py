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
    # seq_lens: (B,) int64 -> (B, H, D). The C++ checks shapes, dtypes and contiguity, with
    # messages (in Python the checks cost as much as the kernel at one short sequence).
    return (kernels or cpu_kernels()).paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
