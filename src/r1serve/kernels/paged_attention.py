"""Attention over a paged KV cache.

Cache layout per layer (one tensor for K, one for V):

    cache[block_id, offset, kv_head, :]   shape (num_blocks, block_size, num_kv_heads, head_dim)

A token at slot s lives at block s // block_size, offset s % block_size.

`paged_attention_reference` is the plain-torch twin every faster kernel is tested against:
it gathers each sequence's keys into a padded batch and calls SDPA with a mask.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from r1serve.kernels.attention_metadata import AttentionMetadata


def write_kv(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
             slot_mapping: torch.Tensor) -> None:
    # k, v: (N, Hkv, D) -> the slots of this step's new tokens
    k_cache.view(-1, *k.shape[1:])[slot_mapping] = k
    v_cache.view(-1, *v.shape[1:])[slot_mapping] = v


def gather_kv(cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    # (num_blocks, bs, Hkv, D) -> (B, Hkv, Lk, D)
    return cache.view(-1, *cache.shape[2:])[meta.key_slots].transpose(1, 2)


def paged_attention_reference(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                              meta: AttentionMetadata, scale: float) -> torch.Tensor:
    # q: (N, H, D) -> (N, H, D)
    B, Tq = meta.num_seqs, max(meta.query_lens)
    q_pad = q.new_zeros(B, Tq, *q.shape[1:])
    q_pad[meta.token_seq, meta.token_pos_in_query] = q
    k, v = gather_kv(k_cache, meta), gather_kv(v_cache, meta)  # (B, Hkv, Lk, D)
    out = F.scaled_dot_product_attention(q_pad.transpose(1, 2), k, v, attn_mask=meta.attn_mask,
                                         scale=scale, enable_gqa=True)  # (B, H, Tq, D)
    return out.transpose(1, 2)[meta.token_seq, meta.token_pos_in_query]
