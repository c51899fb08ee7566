"""Attention over a paged KV cache.

Cache layout per layer (one tensor for K, one for V):

    cache[block_id, offset, kv_head, :]   shape (num_blocks, block_size, num_kv_heads, head_dim)

A token at slot s lives at block s // block_size, offset s % block_size. The cache may be
stored narrower than the activations (bf16 under float32, `kv_cache_dtype`): values are
rounded as they are written and widened as they are read.

`paged_attention_reference` is the plain-torch twin every faster kernel is tested against:
it gathers each sequence's keys into a padded batch and calls SDPA with a mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from r1serve.kernels.attention_metadata import AttentionMetadata


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    # k, v: (N, Hkv, D) -> the slots of this step's new tokens, in the cache's dtype
    k_cache.view(-1, *k.shape[1:])[slot_mapping] = k.to(k_cache.dtype)
    v_cache.view(-1, *v.shape[1:])[slot_mapping] = v.to(v_cache.dtype)


def gather_kv(cache: torch.Tensor, meta: AttentionMetadata, dtype: torch.dtype) -> torch.Tensor:
    # (num_blocks, bs, Hkv, D) -> (B, Hkv, Lk, D) of dtype
    return cache.view(-1, *cache.shape[2:])[meta.key_slots].transpose(1, 2).to(dtype)


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: AttentionMetadata, scale: float) -> torch.Tensor:
    # q: (N, H, D) -> (N, H, D)
    B, Tq = meta.num_seqs, max(meta.query_lens)
    q_pad = q.new_zeros(B, Tq, *q.shape[1:])
    q_pad[meta.token_seq, meta.token_pos_in_query] = q
    k, v = gather_kv(k_cache, meta, q.dtype), gather_kv(v_cache, meta, q.dtype)  # (B, Hkv, Lk, D)
    out = F.scaled_dot_product_attention(q_pad.transpose(1, 2), k, v, attn_mask=meta.attn_mask,
                                         scale=scale, enable_gqa=True)  # (B, H, Tq, D)
    return out.transpose(1, 2)[meta.token_seq, meta.token_pos_in_query]
