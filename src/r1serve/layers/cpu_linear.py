"""The CPU platform's Linear: picks a GEMM by the number of rows in the batch.

    rows <= group_max_rows  int4/int8 group-quantized GEMM (memory-bound decode: int4 is
                                                           about a quarter of bf16's bytes)
    rows <= int8_max_rows   int8 per-channel weight-only GEMM (half of bf16's bytes)
    more rows               packed bf16 oneDNN GEMM (compute-bound: AMX / AVX512-BF16)

Any path can be absent (quantized copies off, no oneDNN bf16); the plain F.linear is the
fallback and the twin all are tested against.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from r1serve.kernels.group_quant_linear import group_quant_linear, to_group_quant
from r1serve.kernels.int8_weight_linear import int8_linear, quantize_per_channel
from r1serve.kernels.onednn_linear import pack_weight, packed_linear, packing_available


@dataclass(frozen=True)
class SmallBatchWeights:
    """The weight-only quantized copies the CPU linears keep for batches of a few rows.

    The linears named in group_bits (as model.named_modules() names them) serve batches of
    up to group_max_rows rows from int4 or int8 groups (the value: 4 or 8 bits); every
    linear serves up to int8_max_rows rows from an int8 per-channel copy (0: none)."""

    int8_max_rows: int = 0
    group_max_rows: int = 0
    group_bits: dict[str, int] = field(default_factory=dict)


class CpuLinear(nn.Module):
    def __init__(self, dense: nn.Linear, int8_max_rows: int, pack: bool, group_max_rows: int = 0,
                 group_bits: int = 4) -> None:
        super().__init__()
        self.bias = dense.bias
        w = dense.weight.detach()
        self.grouped = to_group_quant(w, group_bits) if group_max_rows > 0 else None
        self.group_max_rows = group_max_rows
        # An int8 per-channel copy only where it serves batch sizes the grouped one does not.
        self.int8_max_rows = int8_max_rows if int8_max_rows > group_max_rows else 0
        self.qweight = self.scales = None
        if self.int8_max_rows > 0:
            q, scales = quantize_per_channel(w)
            self.qweight, self.scales = q, scales.to(w.dtype)
        # The plain weight is dropped once packed: the packed copy serves every batch size
        # (a tied embedding keeps its own reference to the same storage).
        self.packed = pack_weight(w) if pack else None
        self.weight = None if pack else dense.weight

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (M, K) -> (M, N)
        rows = x.shape[0]
        if rows <= self.group_max_rows:
            return group_quant_linear(x.contiguous(), self.grouped, self.bias)
        if rows <= self.int8_max_rows:
            y = int8_linear(x, self.qweight, self.scales)
            return y if self.bias is None else y + self.bias
        if self.packed is not None:
            return packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)


def use_cpu_linears(model: nn.Module, plan: SmallBatchWeights) -> int:
    """Swap every nn.Linear of a loaded bf16 model for a CpuLinear; returns how many."""
    pack = packing_available()
    if not pack and plan.int8_max_rows == 0 and not plan.group_bits:
        return 0
    targets = [(name, module) for name, module in model.named_modules() if type(module) is nn.Linear]
    for name, dense in targets:
        parent, _, attr = name.rpartition(".")
        bits = plan.group_bits.get(name)
        layer = CpuLinear(dense, plan.int8_max_rows, pack, plan.group_max_rows if bits else 0, bits or 4)
        setattr(model.get_submodule(parent), attr, layer)
    return len(targets)
