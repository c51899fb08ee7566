"""The CPU platform's Linear: one weight, one GEMM for every batch size.

    quantized   the weight packed in a quantized format (kernels/quantized_weight.py): a
                GGUF's own blocks, or int4/int8 groups quantized once at load. The integer
                GEMM (csrc/quant_gemm.h) serves decode and prefill alike; no float copy of
                the weight exists.
    dense       the float weight: packed once for oneDNN's bf16 GEMM (AMX / AVX512-BF16),
                small batches padded to the row count its AMX kernels start at where that
                measured faster (kernels/onednn_linear.py, measured once per CPU and shape,
                platforms/cpu/tuning_cache.py), or F.linear.

The plain F.linear over the weight a quantized one stands for is the twin both are tested
against.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from r1serve.kernels.onednn_linear import PAD_TO_ROWS, measure_padding, pack_weight, packed_linear
from r1serve.kernels.quantized_weight import QuantizedWeight
from r1serve.platforms.cpu.tuning_cache import TuningCache


class CpuLinear(nn.Module):
    def __init__(self, out_features: int, in_features: int, bias: torch.Tensor | None,
                 quantized: QuantizedWeight | None = None, dense: torch.Tensor | None = None,
                 pack: bool = False, kernels=None) -> None:
        super().__init__()
        assert (quantized is None) != (dense is None), "a CpuLinear holds one weight: quantized or dense"
        self.out_features, self.in_features = out_features, in_features
        self.bias = bias
        self.kernels = kernels  # the compiled CPU kernels of one ISA
        self.quantized = quantized
        if quantized is not None:  # buffers: counted, moved and shared like any weight
            self.register_buffer("qpacked", quantized.packed, persistent=False)
            self.register_buffer("qsegments", quantized.segments, persistent=False)
        self.pad_from_rows = 0  # batches of pad_from_rows..PAD_TO_ROWS - 1 rows are padded (0: none)
        self.packed = pack_weight(dense) if pack and dense is not None else None
        self.weight = dense if self.packed is None and dense is not None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (M, K) -> (M, N)
        if self.quantized is not None:  # the kernel straight from here: this runs ~120 times a token
            return self.kernels.quant_linear(x.contiguous(), self.qpacked, self.qsegments, self.out_features, self.bias)
        if self.packed is not None:
            rows = x.shape[0]
            if 0 < self.pad_from_rows <= rows < PAD_TO_ROWS:
                return packed_linear(F.pad(x, (0, 0, 0, PAD_TO_ROWS - rows)), self.packed, self.bias)[:rows]
            return packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)

    def extra_repr(self) -> str:
        form = ("quantized " + "+".join(f.name for f in self.quantized.formats) if self.quantized is not None
                else "packed bf16" if self.packed is not None else "dense")
        return f"in_features={self.in_features}, out_features={self.out_features}, {form}"


def rounds_activations(model: nn.Module) -> bool:
    """Whether the model's linears serve from quantized weights, rounding each linear's input
    to int8 per 32 values."""
    return any(isinstance(m, CpuLinear) and m.quantized is not None for m in model.modules())


def tune_padding(layers: list[CpuLinear], cache: TuningCache) -> None:
    """Per weight shape, from how many rows padding the packed bf16 GEMM pays: measured once
    per CPU and shape (~0.5 s a model), then read from the cache at every start."""
    by_shape: dict[tuple[int, int], list[CpuLinear]] = {}
    for layer in layers:
        if layer.packed is not None:
            by_shape.setdefault((layer.out_features, layer.in_features), []).append(layer)
    for (n, k), group in by_shape.items():
        # Enough of the shape's layers (up to 64 MB) that they stream from memory, not from L2,
        # as in a decode step: warm-cache timings point the other way for small shapes.
        sample = group[:max(1, min(len(group), (64 << 20) // (2 * n * k)))]
        pad_from = cache.get_or_measure(f"onednn_bf16_pad_from/{n}x{k}",
                                        lambda: measure_padding([layer.packed for layer in sample], k))
        for layer in group:
            layer.pad_from_rows = pad_from
