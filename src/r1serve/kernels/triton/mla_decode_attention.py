"""MLA decode attention on the latent cache, absorbed form: the kernel R1's decode lives on.

Every head attends to the same per-token latent row (kernels/mla_attention.py):

    cache (1, num_blocks, block_size, L + R) = (num_slots, L + R),  row = [ c_kv (L) | k_pe (R) ]
    score[h, t] = (q_lat[h] . c_kv[t] + q_pe[h] . k_pe[t]) * scale
    out[h]      = sum_t softmax(score[h])[t] * c_kv[t]          (N, H, L), W_UV applied after

So decode is multi-query attention with a 576-wide key whose first 512 values are also the
value. For R1 (H = 128, L = 512, R = 64) a decoded token reads 1,152 bytes of bf16 latent per
context position, for all 128 heads together.

Stage 1, grid (H / BLOCK_H, B, S): program (hb, b, s) runs BLOCK_H heads over split s of
sequence b's context, online softmax in float32, and writes its partial output and
log-sum-exp (part_out (B, H, S, L), part_lse (B, H, S)). The head blocks of one (b, s) share
every latent tile; head block is the fastest-varying grid axis so they run side by side and
the second to eighth reads of a tile come from L2, not HBM. Stage 2 is the split merge of
paged_decode_attention.py.

Twin: `mla_absorbed_reference` (kernels/mla_attention.py) on decode-only batches.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1serve.kernels.triton import next_power_of_2
from r1serve.kernels.triton.paged_decode_attention import (check_block_tables, choose_num_splits, dot_precision,
                                                          merge_splits_kernel)
from r1serve.kernels.attention_metadata import AttentionMetadata

BLOCK_H = 16  # heads per program: the smallest M a tensor-core dot takes
BLOCK_N = 32  # context positions per tile: (32, 512) bf16 latents = 32 KiB of shared memory


@triton.jit
def _mla_partial_kernel(q_lat_ptr, q_pe_ptr, cache_ptr, tables_ptr, seq_lens_ptr, out_ptr, lse_ptr, scale,
                        stride_lb, stride_lh, stride_pb, stride_ph, stride_tb,
                        H: tl.constexpr, L: tl.constexpr, R: tl.constexpr, BLOCK_H: tl.constexpr,
                        BLOCK_N: tl.constexpr, BLOCK_SIZE: tl.constexpr, NUM_SPLITS: tl.constexpr,
                        PRECISION: tl.constexpr):
    hb, b, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    heads = hb * BLOCK_H + tl.arange(0, BLOCK_H)
    keep = heads < H
    lat = tl.arange(0, L)
    rope = tl.arange(0, R)
    q_lat = tl.load(q_lat_ptr + b * stride_lb + heads[:, None] * stride_lh + lat[None, :], mask=keep[:, None],
                    other=0.0)  # (BLOCK_H, L)
    q_pe = tl.load(q_pe_ptr + b * stride_pb + heads[:, None] * stride_ph + rope[None, :], mask=keep[:, None],
                   other=0.0)  # (BLOCK_H, R)
    m = tl.full([BLOCK_H], float("-inf"), tl.float32)
    l = tl.zeros([BLOCK_H], tl.float32)
    acc = tl.zeros([BLOCK_H, L], tl.float32)
    for tile in range(start, end, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        valid = pos < end
        block = tl.load(tables_ptr + b * stride_tb + pos // BLOCK_SIZE, mask=valid, other=0)
        row = (block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE) * (L + R)  # (BLOCK_N,)
        c_kv = tl.load(cache_ptr + row[:, None] + lat[None, :], mask=valid[:, None], other=0.0)  # (BLOCK_N, L)
        k_pe = tl.load(cache_ptr + row[:, None] + L + rope[None, :], mask=valid[:, None], other=0.0)  # (BLOCK_N, R)
        scores = tl.dot(q_lat, tl.trans(c_kv), input_precision=PRECISION)
        scores = (tl.dot(q_pe, tl.trans(k_pe), scores, input_precision=PRECISION)) * scale  # (BLOCK_H, BLOCK_N)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        acc = acc * alpha[:, None] + tl.dot(p.to(c_kv.dtype), c_kv, input_precision=PRECISION)
        m = m_new

    found = l > 0  # an empty split contributes nothing
    lse = tl.where(found, m + tl.log(tl.where(found, l, 1.0)), float("-inf"))
    out = tl.where(found[:, None], acc / tl.where(found, l, 1.0)[:, None], 0.0)
    part = (b * H + heads) * NUM_SPLITS + split
    tl.store(lse_ptr + part, lse, mask=keep)
    tl.store(out_ptr + part[:, None] * L + lat[None, :], out, mask=keep[:, None])


def mla_decode_attention_triton(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                                kv_lora_rank: int, scale: float, num_splits: int | None = None) -> torch.Tensor:
    # q_lat: (B, H, L); q_pe: (B, H, R); cache: (1, num_blocks, bs, L + R) -> (B, H, L)
    B, H, L = q_lat.shape
    R = q_pe.shape[-1]
    assert L == kv_lora_rank and q_pe.shape == (B, H, R), f"q_lat {tuple(q_lat.shape)}, q_pe {tuple(q_pe.shape)}"
    assert cache.dim() == 4 and cache.shape[0] == 1 and cache.shape[-1] == L + R, \
        f"latent cache {tuple(cache.shape)} does not hold rows of {L} + {R}"
    assert L == next_power_of_2(L) and R == next_power_of_2(R) and R >= 16, f"L={L}, R={R} must be powers of two"
    assert q_lat.dtype == q_pe.dtype == cache.dtype, f"q_lat {q_lat.dtype}, q_pe {q_pe.dtype}, cache {cache.dtype}"
    assert q_lat.stride(-1) == 1 and q_pe.stride(-1) == 1, "query rows must be dense"
    assert cache.is_contiguous(), "the latent cache must be contiguous"
    assert meta.num_seqs == B and meta.is_decode_only, "decode attention takes exactly one query per sequence"
    check_block_tables(meta, q_lat.device)
    head_blocks = -(-H // BLOCK_H)
    splits = num_splits or choose_num_splits(max(meta.seq_lens), B * head_blocks)
    part_out = torch.empty(B, H, splits, L, dtype=torch.float32, device=q_lat.device)
    part_lse = torch.empty(B, H, splits, dtype=torch.float32, device=q_lat.device)
    out = torch.empty(B, H, L, dtype=q_lat.dtype, device=q_lat.device)
    if B == 0:
        return out
    _mla_partial_kernel[(head_blocks, B, splits)](
        q_lat, q_pe, cache, meta.block_tables, meta.seq_lens_tensor, part_out, part_lse, scale,
        q_lat.stride(0), q_lat.stride(1), q_pe.stride(0), q_pe.stride(1), meta.block_tables.stride(0),
        H=H, L=L, R=R, BLOCK_H=BLOCK_H, BLOCK_N=BLOCK_N, BLOCK_SIZE=cache.shape[2], NUM_SPLITS=splits,
        PRECISION=dot_precision(q_lat.dtype))
    merge_splits_kernel[(B, H)](part_out, part_lse, out, out.stride(0), out.stride(1), H=H, D=L,
                                NUM_SPLITS=splits, SPLITS_PAD=max(2, next_power_of_2(splits)))
    return out
