"""Decode attention on the CPU: one query token per sequence, GQA without repeating K/V.

SDPA with a single query token spends most of its time in setup and in expanding the
key/value heads for grouped queries. Here the query heads of each KV group are folded into
the matmul's M dimension instead, so K and V are read once per group:

    q (B, Hkv, G, D) @ K^T (B, Hkv, D, L) -> scores (B, Hkv, G, L) -> softmax -> @ V

Twin: kernels.paged_attention.paged_attention_reference.
"""
from __future__ import annotations

import torch

from r1serve.kernels.paged_attention import gather_kv, paged_attention_reference
from r1serve.layers.attention_metadata import AttentionMetadata


def cpu_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata, scale: float) -> torch.Tensor:
    if not meta.is_decode_only:
        return paged_attention_reference(q, k_cache, v_cache, meta, scale)
    return decode_attention(q, k_cache, v_cache, meta, scale)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                     meta: AttentionMetadata, scale: float) -> torch.Tensor:
    # q: (B, H, D) -> (B, H, D)
    B, H, D = q.shape
    # Computed in float32 whatever the cache dtype: the CPU's batched GEMMs for these thin
    # shapes run about twice as fast in float32 as in bf16, and the scores keep their precision.
    k = gather_kv(k_cache, meta).float()  # (B, Hkv, L, D)
    v = gather_kv(v_cache, meta).float()
    Hkv = k.shape[1]
    qg = (q.float() * scale).view(B, Hkv, H // Hkv, D)  # scaling q is cheaper than scaling the scores
    scores = torch.matmul(qg, k.transpose(-1, -2))  # (B, Hkv, G, L)
    if B > 1:  # sequences shorter than the longest see padding keys: mask them
        scores.masked_fill_(~meta.attn_mask[:, :, :1, :], float("-inf"))  # (B, 1, 1, L) broadcasts
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).view(B, H, D).to(q.dtype)
