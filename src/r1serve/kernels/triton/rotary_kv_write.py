"""The attention layer's input side in one pass: split the fused q/k/v projection, rotate q and
k (rotate-half form, layers/rotary.py), store k and v in the paged cache, return q.

    qkv (N, (H + 2 Hkv) D) = [ q heads | k heads | v heads ] per token
    cos, sin (N, 1, D/2)       this step's rotary tables
    kv_cache (2, num_blocks, block_size, Hkv, D)

One program per token. Eagerly this is ~25 small ops per layer and a decode step of a small
model is dominated by their launches. A negative slot (CUDA graph padding) stores no k/v.
The rotation runs in float32 and rounds once; the twin rounds after every product, so the
two agree to an ulp of the dtype, not bit for bit.

Twin: `rotary_kv_write_reference` (kernels/rotary_kv_write.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1serve.kernels.triton import next_power_of_2


@triton.jit
def _rotate_heads(src_ptr, heads, keep, cos, sin, HALF: tl.constexpr, D: tl.constexpr):
    # (HEADS_PAD, D/2) first and second halves of each head, turned by (cos, sin)
    half = tl.arange(0, HALF)
    ptrs = src_ptr + heads[:, None] * D + half[None, :]
    x1 = tl.load(ptrs, mask=keep[:, None], other=0.0).to(tl.float32)
    x2 = tl.load(ptrs + HALF, mask=keep[:, None], other=0.0).to(tl.float32)
    return x1 * cos[None, :] - x2 * sin[None, :], x2 * cos[None, :] + x1 * sin[None, :]


@triton.jit
def _rotary_kv_write_kernel(qkv_ptr, cos_ptr, sin_ptr, q_ptr, k_cache_ptr, v_cache_ptr, slot_ptr,
                            stride_qkv, stride_cos, H: tl.constexpr, HKV: tl.constexpr, D: tl.constexpr,
                            H_PAD: tl.constexpr, HKV_PAD: tl.constexpr):
    n = tl.program_id(0).to(tl.int64)
    HALF: tl.constexpr = D // 2
    half = tl.arange(0, HALF)
    cos = tl.load(cos_ptr + n * stride_cos + half).to(tl.float32)
    sin = tl.load(sin_ptr + n * stride_cos + half).to(tl.float32)
    row = qkv_ptr + n * stride_qkv

    heads = tl.arange(0, H_PAD)
    keep = heads < H
    q1, q2 = _rotate_heads(row, heads, keep, cos, sin, HALF, D)
    q_out = q_ptr + n * H * D + heads[:, None] * D + half[None, :]
    tl.store(q_out, q1.to(q_ptr.dtype.element_ty), mask=keep[:, None])
    tl.store(q_out + HALF, q2.to(q_ptr.dtype.element_ty), mask=keep[:, None])

    slot = tl.load(slot_ptr + n)
    if slot >= 0:
        kv_heads = tl.arange(0, HKV_PAD)
        kv_keep = kv_heads < HKV
        k1, k2 = _rotate_heads(row + H * D, kv_heads, kv_keep, cos, sin, HALF, D)
        dst = slot.to(tl.int64) * HKV * D + kv_heads[:, None] * D + half[None, :]  # (HKV_PAD, D/2)
        tl.store(k_cache_ptr + dst, k1.to(k_cache_ptr.dtype.element_ty), mask=kv_keep[:, None])
        tl.store(k_cache_ptr + dst + HALF, k2.to(k_cache_ptr.dtype.element_ty), mask=kv_keep[:, None])
        v_src = row + (H + HKV) * D + kv_heads[:, None] * D + half[None, :]
        tl.store(v_cache_ptr + dst, tl.load(v_src, mask=kv_keep[:, None]), mask=kv_keep[:, None])
        tl.store(v_cache_ptr + dst + HALF, tl.load(v_src + HALF, mask=kv_keep[:, None]), mask=kv_keep[:, None])


def rotary_kv_write_triton(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                           slot_mapping: torch.Tensor, num_heads: int) -> torch.Tensor:
    # qkv: (N, (H + 2 Hkv) D); cos, sin: (N, 1, D/2); kv_cache: (2, num_blocks, bs, Hkv, D) -> q (N, H, D)
    N = qkv.shape[0]
    Hkv, D = kv_cache.shape[-2:]
    assert kv_cache.dim() == 5 and kv_cache.shape[0] == 2 and kv_cache.is_contiguous(), \
        f"kv_cache must be contiguous (2, blocks, bs, Hkv, D), got {tuple(kv_cache.shape)}"
    assert qkv.dim() == 2 and qkv.shape[1] == (num_heads + 2 * Hkv) * D and qkv.stride(1) == 1, \
        f"qkv {tuple(qkv.shape)} does not hold {num_heads} + 2 x {Hkv} heads of {D}"
    assert D >= 4 and D == next_power_of_2(D), f"head_dim {D} must be a power of two"
    assert cos.shape == sin.shape == (N, 1, D // 2) and cos.stride() == sin.stride() and cos.stride(-1) == 1
    assert qkv.dtype == kv_cache.dtype == cos.dtype == sin.dtype, f"qkv {qkv.dtype}, cache {kv_cache.dtype}, rope {cos.dtype}"
    assert slot_mapping.shape == (N,) and slot_mapping.dtype in (torch.int32, torch.int64)
    q = torch.empty(N, num_heads, D, dtype=qkv.dtype, device=qkv.device)
    if N:
        _rotary_kv_write_kernel[(N,)](qkv, cos, sin, q, kv_cache[0], kv_cache[1], slot_mapping, qkv.stride(0),
                                      cos.stride(0), H=num_heads, HKV=Hkv, D=D, H_PAD=next_power_of_2(num_heads),
                                      HKV_PAD=next_power_of_2(Hkv))
    return q
