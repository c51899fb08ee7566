"""Residual add + RMSNorm in one pass over each row.

    h = x + residual            stored as the new residual, in the input dtype
    y = weight * (h / rms(h))   the sum of squares in float32; rounded to the input dtype
                                before the weight multiply, as the twin rounds it

One program per row; the row (hidden <= 8192 for R1's 7168) fits one tile, so the row is
read once and both outputs are written once: 3 row-reads and 2 row-writes become 2 and 2,
and ten eager launches become one. Twin: `add_rms_norm_reference` (kernels/rms_norm.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1serve.kernels.triton import next_power_of_2

MAX_HIDDEN = 16384  # one row per tile; wider rows would spill registers


@triton.jit
def _add_rms_norm_kernel(x_ptr, res_ptr, w_ptr, out_ptr, res_out_ptr, eps, D: tl.constexpr, BLOCK: tl.constexpr,
                         HAS_X: tl.constexpr):
    row = tl.program_id(0).to(tl.int64)
    offs = tl.arange(0, BLOCK)
    mask = offs < D
    h = tl.load(res_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)
    if HAS_X:
        # The add rounds to the input dtype first, as `x + residual` does in the twin.
        h = (h + tl.load(x_ptr + row * D + offs, mask=mask, other=0.0).to(tl.float32)).to(out_ptr.dtype.element_ty)
        tl.store(res_out_ptr + row * D + offs, h, mask=mask)
        h = h.to(tl.float32)
    rstd = tl.rsqrt(tl.sum(h * h, axis=0) / D + eps)
    normed = (h * rstd).to(out_ptr.dtype.element_ty).to(tl.float32)
    w = tl.load(w_ptr + offs, mask=mask, other=0.0).to(tl.float32)
    tl.store(out_ptr + row * D + offs, (w * normed).to(out_ptr.dtype.element_ty), mask=mask)


def add_rms_norm_triton(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    # x, residual: (N, D) -> (norm(x + residual), x + residual); x None: (norm(residual), residual)
    assert residual.dim() == 2 and residual.is_contiguous(), f"residual must be (N, D) contiguous, got {residual.stride()}"
    N, D = residual.shape
    assert residual.dtype in (torch.float32, torch.bfloat16, torch.float16), f"unsupported dtype {residual.dtype}"
    assert weight.shape == (D,) and weight.dtype == residual.dtype and weight.is_contiguous()
    assert x is None or (x.shape == residual.shape and x.dtype == residual.dtype and x.is_contiguous())
    assert D <= MAX_HIDDEN, f"hidden size {D} > {MAX_HIDDEN}: one row must fit one tile"
    out = torch.empty_like(residual)
    h = residual if x is None else torch.empty_like(residual)
    if N:
        block = next_power_of_2(D)
        # R1's 7168-wide rows in one tile: 16 warps keep it at 16 values per thread, not 64.
        _add_rms_norm_kernel[(N,)](x if x is not None else residual, residual, weight, out, h, eps, D=D,
                                   BLOCK=block, HAS_X=x is not None, num_warps=min(16, max(4, block // 512)))
    return out, h
