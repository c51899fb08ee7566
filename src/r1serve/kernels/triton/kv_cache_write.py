"""Writing this step's new K/V rows into the paged cache, and MLA latents into the latent cache.

    K/V cache, one layer:     (2, num_blocks, block_size, Hkv, D)   plane 0 = K, plane 1 = V
    latent cache, one layer:  (1, num_blocks, block_size, L + R)    [ c_kv | k_pe ]

Both are rows of a flat (num_slots, row) table, row = Hkv * D or L + R: token n goes to row
slot_mapping[n]. One program copies one token's row (K and V together). A negative slot
writes nothing: the CUDA graph runner pads decode batches with slot -1, where the torch
index_put of the twins would wrap around to the last slot.

Twins: `write_kv` (kernels/paged_attention.py) and `write_latent` (kernels/mla_attention.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1serve.kernels.triton import next_power_of_2


@triton.jit
def _write_rows_kernel(src0_ptr, dst0_ptr, src1_ptr, dst1_ptr, slot_ptr, stride_src0, stride_src1,
                       ROW: tl.constexpr, BLOCK: tl.constexpr, TWO: tl.constexpr):
    token = tl.program_id(0)
    slot = tl.load(slot_ptr + token)
    if slot >= 0:
        offs = tl.arange(0, BLOCK)
        mask = offs < ROW
        dst = slot.to(tl.int64) * ROW + offs  # int64: num_slots * row passes 2^31 on big caches
        tl.store(dst0_ptr + dst, tl.load(src0_ptr + token * stride_src0 + offs, mask=mask), mask=mask)
        if TWO:
            tl.store(dst1_ptr + dst, tl.load(src1_ptr + token * stride_src1 + offs, mask=mask), mask=mask)


def _check_rows(name: str, rows: torch.Tensor, plane: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    # rows: (N, *token_shape) whose token rows are dense (a row may sit inside a wider fused tensor)
    assert rows.dtype == plane.dtype, f"{name} is {rows.dtype}, the cache {plane.dtype}"
    assert rows.device == plane.device == slot_mapping.device, "tensors on different devices"
    assert rows.shape[1:] == plane.shape[2:], f"{name} {tuple(rows.shape)} does not fit cache rows {tuple(plane.shape)}"
    assert rows[0].is_contiguous(), f"{name} rows must be dense (strides {rows.stride()})"
    assert plane.is_contiguous(), "the cache plane must be contiguous"
    assert slot_mapping.shape == (rows.shape[0],) and slot_mapping.dtype in (torch.int32, torch.int64)


def _launch(pairs: list[tuple[torch.Tensor, torch.Tensor]], slot_mapping: torch.Tensor) -> None:
    (src0, dst0), (src1, dst1) = pairs[0], pairs[-1]
    row = src0[0].numel()
    if src0.shape[0] == 0:
        return
    _write_rows_kernel[(src0.shape[0],)](src0, dst0, src1, dst1, slot_mapping, src0.stride(0), src1.stride(0),
                                         ROW=row, BLOCK=next_power_of_2(row), TWO=len(pairs) == 2)


def write_kv_triton(k_cache: torch.Tensor, v_cache: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                    slot_mapping: torch.Tensor) -> None:
    # k_cache, v_cache: (num_blocks, bs, Hkv, D); k, v: (N, Hkv, D) -> written in place
    _check_rows("k", k, k_cache, slot_mapping)
    _check_rows("v", v, v_cache, slot_mapping)
    _launch([(k, k_cache), (v, v_cache)], slot_mapping)


def write_latent_triton(cache: torch.Tensor, latent: torch.Tensor, slot_mapping: torch.Tensor) -> None:
    # cache: (1, num_blocks, bs, L + R); latent: (N, L + R) -> written in place
    assert cache.dim() == 4 and cache.shape[0] == 1, f"latent cache must be (1, blocks, bs, L+R), got {tuple(cache.shape)}"
    _check_rows("latent", latent, cache[0], slot_mapping)
    _launch([(latent, cache[0])], slot_mapping)
