"""Python side of the hand-written CPU decode attention (csrc/paged_decode_attention.cpp).

The C++ source is compiled on first use with the machine's compiler (torch's
cpp_extension, cached under the torch extensions directory); where that is impossible the
engine keeps the plain-torch path and says so once. Twin: paged_attention_reference.
"""
from __future__ import annotations

import functools
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)
SOURCE = Path(__file__).parent / "csrc" / "paged_decode_attention.cpp"


@functools.cache
def load_extension():
    """The compiled module, or None when no compiler is available (cached per process)."""
    try:
        from torch.utils.cpp_extension import load

        return load(name="r1serve_paged_decode", sources=[str(SOURCE)],
                    extra_cflags=["-O3", "-march=native", "-fopenmp"], extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no headers, ...: fall back, never fail serving
        log.warning("CPU decode attention kernel unavailable (%s); using the plain-torch path", e)
        return None


def paged_decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                           block_tables: torch.Tensor, seq_lens: torch.Tensor, scale: float) -> torch.Tensor:
    # q: (B, H, D); caches: (num_blocks, block_size, Hkv, D); block_tables: (B, max_blocks) int64;
    # seq_lens: (B,) int64 -> (B, H, D)
    assert q.dim() == 3 and k_cache.dim() == 4 and k_cache.shape == v_cache.shape, (q.shape, k_cache.shape)
    assert q.shape[2] == k_cache.shape[3] and q.shape[1] % k_cache.shape[2] == 0, (q.shape, k_cache.shape)
    assert q.dtype == k_cache.dtype == v_cache.dtype and q.dtype in (torch.float32, torch.bfloat16), q.dtype
    assert block_tables.dtype == seq_lens.dtype == torch.int64 and block_tables.shape[0] == q.shape[0] == seq_lens.shape[0]
    assert q.is_contiguous() and k_cache.is_contiguous() and v_cache.is_contiguous() and block_tables.is_contiguous()
    return load_extension().paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale)
