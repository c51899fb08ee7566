"""Multi-head latent attention over the paged latent cache: the plain-torch forms.

Cache layout per layer (one plane):

    cache[0, block_id, offset, :]  = [ c_kv (kv_lora_rank) | k_pe (qk_rope_head_dim) ]

Two ways to attend, equal in exact arithmetic (DeepSeek-V2 paper, section 2.1.2):

- expanded: up-project every cached c_kv with kv_b_proj into per-head K_nope and V, then
  ordinary attention with K = [K_nope | k_pe]. Clear, and cheap for prefill, where the
  new tokens outnumber nothing; it is also the oracle the absorbed form is tested against.
- absorbed: fold kv_b_proj's key half W_UK into the query (q_lat = q_nope W_UK) and its
  value half W_UV after attention, so attention runs on the latent cache directly, as
  multi-query attention with one shared 576-wide key whose first 512 values are also the
  value. Decode reads 576 values per cached token instead of 128 heads x 384.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from r1serve.kernels.attention_metadata import AttentionMetadata


def write_latent(cache: torch.Tensor, latent: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    # latent: (N, L + R) -> the slots of this step's tokens
    cache[0].view(-1, latent.shape[-1])[slot_mapping] = latent


def gather_latent(cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    # (1, num_blocks, bs, L + R) -> (B, Lk, L + R), every context position of each sequence
    return cache[0].view(-1, cache.shape[-1])[meta.key_slots]


def _padded(x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    # (N, H, D) -> (B, H, Tq, D), each sequence's query rows, zero padded
    out = x.new_zeros(meta.num_seqs, max(meta.query_lens), *x.shape[1:])
    out[meta.token_seq, meta.token_pos_in_query] = x
    return out.transpose(1, 2)


def _unpadded(x: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
    # (B, H, Tq, D) -> (N, H, D)
    return x.transpose(1, 2)[meta.token_seq, meta.token_pos_in_query]


def mla_expanded_reference(q_nope: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, kv_b_proj,
                           meta: AttentionMetadata, kv_lora_rank: int, v_head_dim: int, scale: float) -> torch.Tensor:
    # q_nope: (N, H, P); q_pe: (N, H, R) -> (N, H, V)
    H, P = q_nope.shape[1:]
    latent = gather_latent(cache, meta)  # (B, Lk, L + R)
    c_kv, k_pe = latent.split([kv_lora_rank, latent.shape[-1] - kv_lora_rank], dim=-1)
    B, Lk = c_kv.shape[:2]
    kv = kv_b_proj(c_kv.reshape(B * Lk, kv_lora_rank)).view(B, Lk, H, P + v_head_dim)
    k_nope, v = kv.split([P, v_head_dim], dim=-1)
    k = torch.cat((k_nope, k_pe[:, :, None].expand(-1, -1, H, -1)), dim=-1)  # (B, Lk, H, P + R)
    q = _padded(torch.cat((q_nope, q_pe), dim=-1), meta)  # (B, H, Tq, P + R)
    out = F.scaled_dot_product_attention(q, k.transpose(1, 2), v.transpose(1, 2), attn_mask=meta.attn_mask,
                                         scale=scale)  # (B, H, Tq, V)
    return _unpadded(out, meta)


def mla_absorbed_reference(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor,
                           meta: AttentionMetadata, kv_lora_rank: int, scale: float) -> torch.Tensor:
    # q_lat: (N, H, L) = q_nope W_UK; q_pe: (N, H, R) -> (N, H, L), still to be multiplied by W_UV
    latent = gather_latent(cache, meta)[:, None]  # (B, 1, Lk, L + R): one key head shared by all
    q = _padded(torch.cat((q_lat, q_pe), dim=-1), meta)  # (B, H, Tq, L + R)
    # Scores in float32: the latent dot products are 576 terms long.
    scores = torch.matmul(q.float(), latent.float().transpose(-1, -2)) * scale  # (B, H, Tq, Lk)
    scores.masked_fill_(~meta.attn_mask, float("-inf"))
    probs = torch.softmax(scores, dim=-1)
    out = torch.matmul(probs, latent[..., :kv_lora_rank].float())  # (B, H, Tq, L)
    return _unpadded(out, meta).to(q_lat.dtype)
