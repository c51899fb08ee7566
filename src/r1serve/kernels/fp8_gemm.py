"""FP8 block-scaled GEMM as DeepSeek-V3/R1 runs its linears: the plain-torch twins.

    weight   (N, K) float8_e4m3fn, weight_scale_inv (ceil(N / b0), ceil(K / b1)) float32
             (kernels/fp8_block.py: R1's checkpoint format, b0 x b1 = 128 x 128)
    input    (M, K) quantized per token and group of b1 columns: x_q (M, K) float8_e4m3fn,
             x_scale (M, K / b1) float32, chosen so each group's largest |x| maps to FP8_MAX

    y[m, n] = sum over k-groups g of (x_q[m, g] . w[n, g]) * x_scale[m, g] * w_scale[n // b0, g]

Both operands are FP8, so the products run on the FP8 tensor cores (twice the bf16 rate on
Hopper) and the scales are applied once per k-group in float32. The Triton kernels
(kernels/triton/fp8_act_quant.py, fp8_gemm.py) are tested against these.
"""
from __future__ import annotations

import torch

from r1serve.kernels.fp8_block import FP8_MAX, dequantize_fp8_block

# Smallest group maximum that is scaled: an all-zero group would otherwise divide by zero.
GROUP_AMAX_EPS = 1e-10


def act_quant_reference(x: torch.Tensor, group: int) -> tuple[torch.Tensor, torch.Tensor]:
    # x: (M, K) -> x_q (M, K) float8_e4m3fn, x_scale (M, K / group) float32
    M, K = x.shape
    groups = x.float().view(M, K // group, group)
    scale = groups.abs().amax(dim=-1).clamp(min=GROUP_AMAX_EPS) / FP8_MAX  # (M, K / group)
    q = (groups / scale[..., None]).clamp(-FP8_MAX, FP8_MAX).to(torch.float8_e4m3fn)
    return q.view(M, K), scale


def act_dequant(x_q: torch.Tensor, x_scale: torch.Tensor) -> torch.Tensor:
    # (M, K) float8, (M, K / group) -> (M, K) float32
    M, K = x_q.shape
    return (x_q.float().view(M, x_scale.shape[1], -1) * x_scale[..., None]).view(M, K)


def fp8_block_gemm_reference(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                             weight_scale_inv: torch.Tensor, block: tuple[int, int],
                             out_dtype: torch.dtype) -> torch.Tensor:
    # (M, K) float8 with (M, K / b1) scales, weight (N, K) float8 -> (M, N) out_dtype
    w = dequantize_fp8_block(weight, weight_scale_inv, block)  # (N, K) float32
    return (act_dequant(x_q, x_scale) @ w.T).to(out_dtype)


def fp8_linear_reference(x: torch.Tensor, weight: torch.Tensor, weight_scale_inv: torch.Tensor,
                         block: tuple[int, int]) -> torch.Tensor:
    # x: (M, K) -> (M, N) in x's dtype: quantize the input, then the block-scaled GEMM
    x_q, x_scale = act_quant_reference(x, block[1])
    return fp8_block_gemm_reference(x_q, x_scale, weight, weight_scale_inv, block, x.dtype)
