"""Paged decode attention for GQA, split-K over long contexts.

One query token per sequence. The cache is read as a flat table of slots:

    k_cache, v_cache: (num_blocks, block_size, Hkv, D) = (num_slots, Hkv, D)
    position p of sequence b lives in slot block_tables[b, p // block_size] * block_size + p % block_size

Stage 1, grid (B, Hkv, S): program (b, g, s) takes split s of sequence b's context (an equal
share, rounded up to whole tiles of BLOCK_N positions) and the GROUP = H / Hkv query heads
that share kv head g, so each K/V tile is read from memory once for the whole group. It runs
an online softmax over its tiles and writes its normalised partial output and log-sum-exp:

    part_out (B, H, S, D) float32,  part_lse (B, H, S) float32   (-inf for an empty split)

Stage 2, grid (B, H): merges the S partials, weighting each by exp(lse_s - max lse).

Splitting keeps the GPU busy at small batches: with one program per (sequence, kv head) a
batch of 1 on an 8-kv-head model would occupy 8 of 132 SMs. Splits are derived on the device
from seq_lens, so a CUDA graph captured once stays correct as sequences grow.

Twin: `paged_attention_reference` (kernels/paged_attention.py) on decode-only batches.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1serve.kernels.triton import next_power_of_2
from r1serve.kernels.attention_metadata import AttentionMetadata

BLOCK_N = 32  # context positions per tile
MIN_TOKENS_PER_SPLIT = 256  # below this a split's fixed cost outweighs the parallelism it adds
MAX_SPLITS = 16
TARGET_PROGRAMS = 1024  # about eight resident programs per SM on a 132-SM H100/H200


@triton.jit
def _decode_partial_kernel(q_ptr, k_ptr, v_ptr, tables_ptr, seq_lens_ptr, out_ptr, lse_ptr, scale,
                           stride_qb, stride_qh, stride_slot, stride_kvh, stride_tb,
                           H: tl.constexpr, GROUP: tl.constexpr, GROUP_PAD: tl.constexpr, D: tl.constexpr,
                           BLOCK_SIZE: tl.constexpr, BLOCK_N: tl.constexpr, NUM_SPLITS: tl.constexpr,
                           PRECISION: tl.constexpr):
    b, g, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    seq_len = tl.load(seq_lens_ptr + b).to(tl.int32)
    per_split = tl.cdiv(tl.cdiv(seq_len, NUM_SPLITS), BLOCK_N) * BLOCK_N
    start = split * per_split
    end = tl.minimum(start + per_split, seq_len)

    lanes = tl.arange(0, GROUP_PAD)  # query heads of this group, padded to a dot-able 16
    heads = g * GROUP + lanes
    d = tl.arange(0, D)
    q = tl.load(q_ptr + b * stride_qb + heads[:, None] * stride_qh + d[None, :], mask=lanes[:, None] < GROUP,
                other=0.0)  # (GROUP_PAD, D)
    m = tl.full([GROUP_PAD], float("-inf"), tl.float32)
    l = tl.zeros([GROUP_PAD], tl.float32)
    acc = tl.zeros([GROUP_PAD, D], tl.float32)
    for tile in range(start, end, BLOCK_N):
        pos = tile + tl.arange(0, BLOCK_N)
        valid = pos < end
        block = tl.load(tables_ptr + b * stride_tb + pos // BLOCK_SIZE, mask=valid, other=0)
        slot = block.to(tl.int64) * BLOCK_SIZE + pos % BLOCK_SIZE
        kv_off = slot[:, None] * stride_slot + g * stride_kvh + d[None, :]  # (BLOCK_N, D)
        k = tl.load(k_ptr + kv_off, mask=valid[:, None], other=0.0)
        scores = tl.dot(q, tl.trans(k), input_precision=PRECISION) * scale  # (GROUP_PAD, BLOCK_N)
        scores = tl.where(valid[None, :], scores, float("-inf"))
        m_new = tl.maximum(m, tl.max(scores, axis=1))
        alpha = tl.exp(m - m_new)
        p = tl.exp(scores - m_new[:, None])
        l = l * alpha + tl.sum(p, axis=1)
        v = tl.load(v_ptr + kv_off, mask=valid[:, None], other=0.0)
        acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=PRECISION)
        m = m_new

    found = l > 0  # an empty split (a short sequence in a long batch) contributes nothing
    lse = tl.where(found, m + tl.log(tl.where(found, l, 1.0)), float("-inf"))
    out = tl.where(found[:, None], acc / tl.where(found, l, 1.0)[:, None], 0.0)
    row = (b * H + heads) * NUM_SPLITS + split  # (GROUP_PAD,) rows of part_lse
    keep = lanes < GROUP
    tl.store(lse_ptr + row, lse, mask=keep)
    tl.store(out_ptr + row[:, None] * D + d[None, :], out, mask=keep[:, None])


@triton.jit
def merge_splits_kernel(part_out_ptr, part_lse_ptr, out_ptr, stride_ob, stride_oh, H: tl.constexpr,
                         D: tl.constexpr, NUM_SPLITS: tl.constexpr, SPLITS_PAD: tl.constexpr):
    b, h = tl.program_id(0), tl.program_id(1)
    s = tl.arange(0, SPLITS_PAD)
    d = tl.arange(0, D)
    row = (b * H + h) * NUM_SPLITS + s
    lse = tl.load(part_lse_ptr + row, mask=s < NUM_SPLITS, other=float("-inf"))
    w = tl.exp(lse - tl.max(lse, axis=0))  # split 0 always has tokens: the max is finite
    part = tl.load(part_out_ptr + row[:, None] * D + d[None, :], mask=(s < NUM_SPLITS)[:, None], other=0.0)
    out = tl.sum(w[:, None] * part, axis=0) / tl.sum(w, axis=0)
    tl.store(out_ptr + b * stride_ob + h * stride_oh + d, out.to(out_ptr.dtype.element_ty))


def choose_num_splits(max_seq_len: int, programs_without_split: int) -> int:
    """A power of two (one compiled variant each): enough splits to fill the GPU, none that
    would hold fewer than MIN_TOKENS_PER_SPLIT positions."""
    splits = 1
    while (splits < MAX_SPLITS and max_seq_len >= 2 * splits * MIN_TOKENS_PER_SPLIT
           and programs_without_split * splits * 2 <= TARGET_PROGRAMS):
        splits *= 2
    return splits


def dot_precision(dtype: torch.dtype) -> str:
    # float32 models ask for exact float32 dots; tf32 would round the inputs to 10 mantissa bits.
    return "ieee" if dtype == torch.float32 else "tf32"


def check_block_tables(meta: AttentionMetadata, device: torch.device) -> None:
    B = meta.num_seqs
    assert meta.block_tables.dim() == 2 and meta.block_tables.shape[0] == B, "block_tables must be (B, max_blocks)"
    assert meta.block_tables.stride(1) == 1 and meta.block_tables.dtype in (torch.int32, torch.int64)
    assert meta.seq_lens_tensor.shape == (B,) and meta.seq_lens_tensor.is_contiguous()
    assert meta.block_tables.device == meta.seq_lens_tensor.device == device, "metadata on another device"


def paged_decode_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                                  meta: AttentionMetadata, scale: float, num_splits: int | None = None) -> torch.Tensor:
    # q: (B, H, D), one token per sequence; k_cache, v_cache: (num_blocks, bs, Hkv, D) -> (B, H, D)
    B, H, D = q.shape
    num_blocks, bs, Hkv, Dk = k_cache.shape
    assert meta.num_seqs == B and meta.is_decode_only, "decode attention takes exactly one query per sequence"
    assert Dk == D and v_cache.shape == k_cache.shape, f"q {tuple(q.shape)} against cache {tuple(k_cache.shape)}"
    assert H % Hkv == 0, f"{H} query heads do not group over {Hkv} kv heads"
    assert D >= 16 and D == next_power_of_2(D), f"head_dim {D} must be a power of two >= 16"
    assert q.dtype == k_cache.dtype == v_cache.dtype, f"q {q.dtype}, cache {k_cache.dtype}"
    assert q.stride(-1) == 1, "q rows must be dense"
    assert k_cache.is_contiguous() and v_cache.is_contiguous(), "cache planes must be contiguous"
    check_block_tables(meta, q.device)
    group = H // Hkv
    splits = num_splits or choose_num_splits(max(meta.seq_lens), B * Hkv)
    part_out = torch.empty(B, H, splits, D, dtype=torch.float32, device=q.device)
    part_lse = torch.empty(B, H, splits, dtype=torch.float32, device=q.device)
    out = torch.empty(B, H, D, dtype=q.dtype, device=q.device)
    if B == 0:
        return out
    _decode_partial_kernel[(B, Hkv, splits)](
        q, k_cache, v_cache, meta.block_tables, meta.seq_lens_tensor, part_out, part_lse, scale,
        q.stride(0), q.stride(1), k_cache.stride(1), k_cache.stride(2), meta.block_tables.stride(0),
        H=H, GROUP=group, GROUP_PAD=max(16, next_power_of_2(group)), D=D, BLOCK_SIZE=bs, BLOCK_N=BLOCK_N,
        NUM_SPLITS=splits, PRECISION=dot_precision(q.dtype))
    merge_splits_kernel[(B, H)](part_out, part_lse, out, out.stride(0), out.stride(1), H=H, D=D,
                                 NUM_SPLITS=splits, SPLITS_PAD=max(2, next_power_of_2(splits)))
    return out
