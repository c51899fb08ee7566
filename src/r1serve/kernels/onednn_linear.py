"""bf16 GEMM through oneDNN with the weight packed once, ahead of time.

`F.linear` hands oneDNN a plain row-major weight and oneDNN reorders it into its blocked
layout (the one AMX / AVX512-BF16 tiles read) on every call. Packing once at load time
removes that per-call reorder; the result is bit-identical to `F.linear` in bf16 (tested).

Twin: `torch.nn.functional.linear` on the unpacked weight.
"""
from __future__ import annotations

import torch


def packing_available() -> bool:
    return torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported()


def pack_weight(weight: torch.Tensor, batch_hint: int = 32) -> torch.Tensor:
    # weight: (N, K) bf16 -> an opaque oneDNN tensor; valid for any number of rows, tuned for batch_hint
    assert weight.dtype == torch.bfloat16 and weight.dim() == 2, (weight.dtype, weight.shape)
    return torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None) -> torch.Tensor:
    # x: (M, K) bf16 -> (M, N)
    assert x.dtype == torch.bfloat16 and x.dim() == 2, (x.dtype, x.shape)
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")
