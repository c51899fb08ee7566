"""The CPU platform's Linear: picks a GEMM by the number of rows in the batch.

    rows <= int8_max_rows   int8 weight-only GEMM   (memory-bound decode: half the bytes of bf16)
    more rows               packed bf16 oneDNN GEMM (compute-bound: AMX / AVX512-BF16)

Either path can be absent (int8 off, or no oneDNN bf16); the plain F.linear is the fallback
and the twin both are tested against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1serve.kernels.int8_weight_linear import int8_linear, quantize_per_channel
from r1serve.kernels.onednn_linear import pack_weight, packed_linear, packing_available


class CpuLinear(nn.Module):
    def __init__(self, dense: nn.Linear, int8_max_rows: int, pack: bool) -> None:
        super().__init__()
        self.bias = dense.bias
        self.int8_max_rows = int8_max_rows
        w = dense.weight.detach()
        self.qweight = self.scales = self.packed = None
        if int8_max_rows > 0:
            q, scales = quantize_per_channel(w)
            self.qweight, self.scales = q, scales.to(w.dtype)
        # The plain weight is dropped once packed: the packed copy serves every batch size
        # (a tied embedding keeps its own reference to the same storage).
        self.packed = pack_weight(w) if pack else None
        self.weight = None if pack else dense.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (M, K) -> (M, N)
        if self.qweight is not None and x.shape[0] <= self.int8_max_rows:
            y = int8_linear(x, self.qweight, self.scales)
            return y if self.bias is None else y + self.bias
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_cpu_linears(model: nn.Module, int8_max_rows: int) -> int:
    """Swap every nn.Linear of a loaded bf16 model for a CpuLinear; returns how many."""
    pack = packing_available()
    if not pack and int8_max_rows == 0:
        return 0
    targets = [(parent, name, child) for parent in model.modules()
               for name, child in parent.named_children() if type(child) is nn.Linear]
    for parent, name, child in targets:
        setattr(parent, name, CpuLinear(child, int8_max_rows, pack))
    return len(targets)
