"""Attention on the CPU over the paged cache, without padding sequences to a common length.

Decode (one query token per sequence) runs the hand-written kernel of cpu_paged_decode.py,
which reads the paged cache in place. Without a compiler, `decode_attention` is the torch
path: the query heads of each KV group are folded into the matmul's M dimension, so K and
V are read once per group instead of being repeated for GQA:

    q (B, Hkv, G, D) @ K^T (B, Hkv, D, L) -> scores (B, Hkv, G, L) -> softmax -> @ V

Mixed steps (decodes next to prefill chunks): padding every sequence to the longest query,
as the twin does, would multiply the work by the batch size; decode rows go through the
decode path together and each prefill chunk through SDPA on its own.

Twin: kernels.paged_attention.paged_attention_reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from r1serve.kernels.cpu_extension import cpu_kernels
from r1serve.kernels.cpu_paged_decode import paged_decode_attention
from r1serve.kernels.attention_metadata import AttentionMetadata


def cpu_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                  meta: AttentionMetadata, scale: float, kernels=None) -> torch.Tensor:
    # q: (N, H, D) -> (N, H, D); kernels: the compiled module of one ISA (default: the CPU's best)
    kernels = kernels or cpu_kernels()
    if meta.is_decode_only:
        return _decode(q, k_cache, v_cache, meta, list(range(meta.num_seqs)), scale, kernels)
    out = torch.empty_like(q)
    starts = [0]
    for n in meta.query_lens:
        starts.append(starts[-1] + n)
    decodes = [b for b, n in enumerate(meta.query_lens) if n == 1]
    if decodes:
        rows = torch.tensor([starts[b] for b in decodes], device=q.device)
        out[rows] = _decode(q[rows], k_cache, v_cache, meta, decodes, scale, kernels)
    for b, (n, s) in enumerate(zip(meta.query_lens, meta.seq_lens)):
        if n > 1:
            out[starts[b]:starts[b + 1]] = prefill_attention(q[starts[b]:starts[b + 1]], k_cache, v_cache,
                                                             meta.key_slots[b, :s], meta.attn_mask[b, :, :n, :s], scale)
    return out


def _decode(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
            seqs: list[int], scale: float, kernels) -> torch.Tensor:
    # q: (len(seqs), H, D), one query token for each of the sequences `seqs`
    if kernels is not None:  # the hand-written kernel reads the paged cache in place
        if len(seqs) == meta.num_seqs:  # all of them (decode-only steps): no gather of the tables
            tables, lens = meta.block_tables, meta.seq_lens_tensor
        else:
            tables, lens = meta.block_tables[seqs].contiguous(), meta.seq_lens_tensor[seqs]
        return paged_decode_attention(q.contiguous(), k_cache, v_cache, tables, lens, scale, kernels)
    L = max(meta.seq_lens[b] for b in seqs)  # the longest sequence sets the key length
    return decode_attention(q, k_cache, v_cache, meta.key_slots[seqs, :L], meta.attn_mask[seqs, :, :1, :L], scale)


def _gather(cache: torch.Tensor, slots: torch.Tensor) -> torch.Tensor:
    # (num_blocks, bs, Hkv, D), slots (..., L) -> (..., Hkv, L, D)
    return cache.view(-1, *cache.shape[2:])[slots].transpose(-3, -2)


def decode_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_slots: torch.Tensor,
                     valid: torch.Tensor, scale: float) -> torch.Tensor:
    # q: (B, H, D); key_slots: (B, L) with L the longest sequence; valid: (B, 1, 1, L) bool -> (B, H, D)
    B, H, D = q.shape
    # Computed in float32 whatever the cache dtype: the CPU's batched GEMMs for these thin
    # shapes run about twice as fast in float32 as in bf16, and the scores keep their precision.
    k = _gather(k_cache, key_slots).float()  # (B, Hkv, L, D)
    v = _gather(v_cache, key_slots).float()
    Hkv = k.shape[1]
    qg = (q.float() * scale).view(B, Hkv, H // Hkv, D)  # scaling q is cheaper than scaling the scores
    scores = torch.matmul(qg, k.transpose(-1, -2))  # (B, Hkv, G, L)
    if B > 1:  # sequences shorter than the longest see padding keys: mask them
        scores.masked_fill_(~valid, float("-inf"))  # (B, 1, 1, L) broadcasts over heads
    probs = torch.softmax(scores, dim=-1)
    return torch.matmul(probs, v).view(B, H, D).to(q.dtype)


def prefill_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, key_slots: torch.Tensor,
                      mask: torch.Tensor, scale: float) -> torch.Tensor:
    # One sequence. q: (n, H, D); key_slots: (s,); mask: (1, n, s) bool -> (n, H, D)
    k = _gather(k_cache, key_slots)[None].to(q.dtype)  # (1, Hkv, s, D), widened if the cache is narrower
    v = _gather(v_cache, key_slots)[None].to(q.dtype)
    out = F.scaled_dot_product_attention(q.transpose(0, 1)[None], k, v, attn_mask=mask[None],
                                         scale=scale, enable_gqa=True)  # (1, H, n, D)
    return out[0].transpose(0, 1)
