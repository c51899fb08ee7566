"""The CPU platform's Linear: picks a GEMM by the number of rows in the batch.

    rows <= group_max_rows  int4/int8 group-quantized GEMM (memory-bound decode: int4 is
                                                           about a quarter of bf16's bytes)
    rows <= int8_max_rows   int8 per-channel weight-only GEMM (half of bf16's bytes)
    more rows               packed bf16 oneDNN GEMM (compute-bound: AMX / AVX512-BF16),
                            small batches padded to the row count its AMX kernels start at
                            where that measures faster (kernels/onednn_linear.py)

Any path can be absent (quantized copies off, no oneDNN bf16); the plain F.linear is the
fallback and the twin all are tested against.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from r1serve.kernels.group_quant_linear import group_quant_linear, to_group_quant
from r1serve.kernels.int8_weight_linear import int8_linear, quantize_per_channel
from r1serve.kernels.onednn_linear import (PAD_TO_ROWS, measure_padding, pack_weight, packed_linear,
                                           packing_available)

log = logging.getLogger(__name__)


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
        self.pad_from_rows = 0  # batches of pad_from_rows..PAD_TO_ROWS - 1 rows are padded (0: none)
        self.bias = dense.bias
        self.out_features, self.in_features = dense.out_features, dense.in_features
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
            if 0 < self.pad_from_rows <= rows < PAD_TO_ROWS:
                return packed_linear(F.pad(x, (0, 0, 0, PAD_TO_ROWS - rows)), self.packed, self.bias)[:rows]
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
    if pack:
        tune_padding([m for m in model.modules() if isinstance(m, CpuLinear)])
    return len(targets)


def tune_padding(layers: list[CpuLinear], sample_bytes: int = 64 << 20) -> None:
    """Measure, per weight shape, from how many rows padding the packed GEMM pays and set it
    on every layer of that shape (~0.5 s per model). Each shape is timed on enough of its
    layers (up to sample_bytes of weights) that they stream from memory, not from L2, as
    they do in a decode step: warm-cache timings point the other way for small shapes."""
    by_shape: dict[tuple, list[CpuLinear]] = {}
    for layer in layers:
        if layer.packed is not None:
            by_shape.setdefault((layer.out_features, layer.in_features), []).append(layer)
    for (n, k), group in by_shape.items():
        count = max(1, min(len(group), sample_bytes // (2 * n * k)))
        pad_from = measure_padding([layer.packed for layer in group[:count]], k)
        log.info("packed bf16 GEMM %dx%d: %s", n, k,
                 f"batches of {pad_from} to {PAD_TO_ROWS - 1} rows padded to {PAD_TO_ROWS}" if pad_from else "no padding")
        for layer in group:
            layer.pad_from_rows = pad_from
