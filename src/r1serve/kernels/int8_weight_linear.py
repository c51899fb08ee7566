"""Weight-only int8 GEMM for small batches on the CPU.

Decoding one or a few sequences is bound by reading the weights: every step streams the
whole model from memory for a handful of rows of activations. An int8 copy of each weight
(one scale per output channel) halves those bytes against bfloat16, and PyTorch's CPU
`_weight_int8pack_mm` multiplies bf16 activations by it directly (a hand-written int8 GEMV
was tried and streamed weights at 7.8 GB/s against this op's 10.3). For larger batches
the dense bf16 weight (AMX / AVX512-BF16) is faster: the CPU platform's Linear
(platforms/cpu/linear.py) keeps both and the row count picks one.

Twin: `int8_linear_reference` (dequantize, then a plain matmul).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F


def quantize_per_channel(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # weight: (N, K) -> int8 (N, K), scales (N,) with weight ~= q * scale
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-12)
    q = torch.round(w / scales[:, None]).clamp(-127, 127).to(torch.int8)
    return q.contiguous(), scales


def int8_linear_reference(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    return F.linear(x.float(), qweight.float() * scales.float()[:, None]).to(x.dtype)


def int8_linear(x: torch.Tensor, qweight: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    # x: (M, K) bf16; qweight: (N, K) int8; scales: (N,) bf16 -> (M, N)
    assert x.dim() == 2 and x.shape[1] == qweight.shape[1], (x.shape, qweight.shape)
    assert qweight.dtype == torch.int8 and qweight.is_contiguous()
    assert scales.dtype == x.dtype and scales.shape == (qweight.shape[0],)
    return torch._weight_int8pack_mm(x.contiguous(), qweight, scales)
