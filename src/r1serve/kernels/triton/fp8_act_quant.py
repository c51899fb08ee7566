"""Quantizing activations to FP8 per token and group of columns, for the FP8 GEMMs.

    x (M, K) -> x_q (M, K) float8_e4m3fn, x_scale (M, K / group) float32
    x_scale[m, g] = max(|x[m, g]|) / FP8_MAX;  x_q = x / x_scale, clamped to +-FP8_MAX

One program per (row, group): a group (128 values for R1) is one tile, read once.
Twin: `act_quant_reference` (kernels/fp8_gemm.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1serve.kernels.fp8_gemm import GROUP_AMAX_EPS
from r1serve.kernels.fp8_block import FP8_MAX


@triton.jit
def _act_quant_kernel(x_ptr, q_ptr, s_ptr, stride_x, K: tl.constexpr, GROUP: tl.constexpr, FP8_MAX: tl.constexpr,
                      EPS: tl.constexpr):
    row, g = tl.program_id(0).to(tl.int64), tl.program_id(1)
    cols = g * GROUP + tl.arange(0, GROUP)
    x = tl.load(x_ptr + row * stride_x + cols).to(tl.float32)
    # Correctly rounded divisions (a GPU's `/` is approximate): the FP8 values and scales are
    # then bit-identical to the twin's.
    scale = tl.div_rn(tl.maximum(tl.max(tl.abs(x), axis=0), EPS), FP8_MAX)
    q = tl.clamp(tl.div_rn(x, scale), -FP8_MAX, FP8_MAX)
    tl.store(q_ptr + row * K + cols, q.to(q_ptr.dtype.element_ty))
    tl.store(s_ptr + row * (K // GROUP) + g, scale)


def act_quant_triton(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    # x: (M, K) -> x_q (M, K) float8_e4m3fn, x_scale (M, K / group) float32
    assert x.dim() == 2 and x.stride(1) == 1, f"x must be (M, K) with dense rows, got strides {x.stride()}"
    M, K = x.shape
    assert x.dtype in (torch.float32, torch.bfloat16, torch.float16), f"unsupported dtype {x.dtype}"
    assert K % group == 0 and group >= 16 and group & (group - 1) == 0, \
        f"K={K} must be a multiple of the group {group}, a power of two >= 16"
    x_q = torch.empty(M, K, dtype=torch.float8_e4m3fn, device=x.device)
    x_scale = torch.empty(M, K // group, dtype=torch.float32, device=x.device)
    if M:
        _act_quant_kernel[(M, K // group)](x, x_q, x_scale, x.stride(0), K=K, GROUP=group, FP8_MAX=FP8_MAX,
                                           EPS=GROUP_AMAX_EPS)
    return x_q, x_scale
