"""The CPU platform's Linear: picks a GEMM by the number of rows in the batch.

    rows <= group_max_rows  int4/int8 group-quantized GEMM (kernels/group_quant_linear.py:
                            integer dot products, weights at 4.5 or 8.5 bits)
    rows <= int8_max_rows   int8 per-channel weight-only GEMM (bf16 only)
    more rows               the dense weight: packed bf16 oneDNN GEMM (AMX / AVX512-BF16),
                            small batches padded to the row count its AMX kernels start at
                            where that measures faster (kernels/onednn_linear.py), or
                            F.linear

With bf16 activations (a CPU with native bf16) how many rows the groups serve is measured
per weight shape at load, against the dense GEMM (`tune_group_rows`). With float32
activations (AVX2, NEON: no native bf16) a linear the checkpoint stores quantized keeps
only its groups, which serve every batch: a float32 copy of a 4-bit weight is 7x the bytes
for a decode step to stream, and at prefill sizes the integer GEMM measured within 10% of
float32 MKL (docs/performance.md). The plain F.linear is the twin all paths are tested
against.
"""
from __future__ import annotations

import logging
import statistics
import sys
import time
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from torch import nn

from r1serve.kernels.cpu_extension import cpu_kernels
from r1serve.kernels.group_quant_linear import group_quant_linear, to_group_quant
from r1serve.kernels.int8_weight_linear import int8_linear, quantize_per_channel
from r1serve.kernels.onednn_linear import (PAD_TO_ROWS, measure_padding, pack_weight, packed_linear,
                                           packing_available)
from r1serve.layers.embedding import VocabEmbedding

log = logging.getLogger(__name__)
ALL_ROWS = sys.maxsize
GROUP_ROW_CANDIDATES = (1, 4, 8, 16, 32, 64)


@dataclass(frozen=True)
class SmallBatchWeights:
    """The weight-only quantized copies the CPU linears keep.

    The linears named in group_bits (as model.named_modules() names them) serve batches of
    up to group_max_rows rows from int4 or int8 groups (the value: 4 or 8 bits; None:
    measured per shape); every linear serves up to int8_max_rows rows from an int8
    per-channel copy (0: none)."""

    int8_max_rows: int = 0
    group_max_rows: int | None = 0
    group_bits: dict[str, int] = field(default_factory=dict)


class CpuLinear(nn.Module):
    def __init__(self, dense: nn.Linear, int8_max_rows: int, pack: bool, group_max_rows: int = 0,
                 group_bits: int = 4, keep_dense: bool = True, kernels=None) -> None:
        super().__init__()
        self.kernels = kernels  # the compiled CPU kernels of one ISA (None: the CPU's best)
        self.pad_from_rows = 0  # batches of pad_from_rows..PAD_TO_ROWS - 1 rows are padded (0: none)
        self.bias = dense.bias
        self.out_features, self.in_features = dense.out_features, dense.in_features
        w = dense.weight.detach()
        self.grouped = to_group_quant(w, group_bits) if group_max_rows > 0 else None
        self.group_max_rows = group_max_rows
        # The compiled kernel itself; group_quant_linear(x, self.grouped, ...) is the same call
        # with its argument checks (the C++ checks them again).
        self._grouped_gemm = (kernels or cpu_kernels()).group_quant_linear if self.grouped is not None else None
        keep_dense = keep_dense or self.grouped is None
        # An int8 per-channel copy only where it serves batch sizes the grouped one does not.
        self.int8_max_rows = int8_max_rows if int8_max_rows > group_max_rows and keep_dense else 0
        self.qweight = self.scales = None
        if self.int8_max_rows > 0:
            q, scales = quantize_per_channel(w)
            self.qweight, self.scales = q, scales.to(w.dtype)
        # The plain weight is dropped once packed or when the groups serve every batch (a tied
        # embedding keeps its own reference to the same storage).
        self.packed = pack_weight(w) if pack and keep_dense else None
        self.weight = dense.weight if keep_dense and self.packed is None else None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (M, K) -> (M, N)
        rows = x.shape[0]
        if rows <= self.group_max_rows:  # the kernel straight from here: this runs ~120 times a token
            g = self.grouped
            return self._grouped_gemm(x.contiguous(), g.packed, g.out_features, g.bits, self.bias)
        if rows <= self.int8_max_rows:
            y = int8_linear(x, self.qweight, self.scales)
            return y if self.bias is None else y + self.bias
        return self.dense(x)

    def dense(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None:
            rows = x.shape[0]
            if 0 < self.pad_from_rows <= rows < PAD_TO_ROWS:
                return packed_linear(F.pad(x, (0, 0, 0, PAD_TO_ROWS - rows)), self.packed, self.bias)[:rows]
            return packed_linear(x, self.packed, self.bias)
        return F.linear(x, self.weight, self.bias)


def rounds_activations(model: nn.Module) -> bool:
    """Whether the model's linears serve every batch from int4/int8 groups, rounding each
    linear's input to int8 per 32 values (the float32 path of a quantized checkpoint)."""
    return any(isinstance(m, CpuLinear) and m.group_max_rows == ALL_ROWS for m in model.modules())


def stage_weights(model: nn.Module, plan: SmallBatchWeights, dtype: torch.dtype) -> None:
    """Before loading: a float32 model's linears that will serve from groups alone hold their
    weights in bf16 until use_cpu_linears quantizes them, so loading never holds a float32
    copy of the whole model (540 MB for a 135M model whose file is 90 MB). The group codes
    come back the same: a GGUF block's values are scale * code + min, and rounding them to
    bf16 keeps each within half a level (tests/test_group_quant_linear.py). A tied LM head
    shares the embedding's float32 weight and keeps it."""
    if dtype != torch.float32 or not plan.group_bits:
        return
    shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
    for name, module in model.named_modules():
        if type(module) is nn.Linear and name in plan.group_bits and id(module.weight) not in shared:
            module.weight = nn.Parameter(torch.empty_like(module.weight, dtype=torch.bfloat16), requires_grad=False)


@dataclass(frozen=True)
class _LinearChoice:
    """What every CpuLinear of one model keeps, from its plan and dtype."""

    pack: bool  # a packed bf16 copy for large batches
    int8_rows: int
    group_rows: int  # the rows its groups serve, for the linears the plan names

    @property
    def keep_dense(self) -> bool:  # groups serving every batch leave the dense weight no use
        return self.group_rows != ALL_ROWS


def _linear_choice(plan: SmallBatchWeights, dtype: torch.dtype) -> _LinearChoice | None:
    pack = dtype == torch.bfloat16 and packing_available()
    int8_rows = plan.int8_max_rows if dtype == torch.bfloat16 else 0
    if dtype not in (torch.float32, torch.bfloat16) or (not pack and int8_rows == 0 and not plan.group_bits):
        return None
    # float32 activations: groups serve every batch and the float32 weight goes. bf16: up to
    # the plan's rows, or (None) the most a candidate can be until tune_group_rows measures.
    if dtype == torch.float32:
        return _LinearChoice(pack, int8_rows, ALL_ROWS)
    return _LinearChoice(pack, int8_rows, GROUP_ROW_CANDIDATES[-1] if plan.group_max_rows is None else plan.group_max_rows)


def convert_linear(model: nn.Module, name: str, plan: SmallBatchWeights, dtype: torch.dtype, kernels=None) -> None:
    """Swap the loaded nn.Linear `name` for a CpuLinear. The loader calls this as soon as a
    linear's weight is complete, so that the quantized or packed copy replaces each weight
    while the rest still load: the staged copies of all weights are never alive at once."""
    choice = _linear_choice(plan, dtype)
    dense = model.get_submodule(name)
    if choice is None or type(dense) is not nn.Linear:
        return
    parent, _, attr = name.rpartition(".")
    bits = plan.group_bits.get(name)
    tied = [m for m in model.modules() if isinstance(m, VocabEmbedding) and m.weight is dense.weight]
    layer = CpuLinear(dense, choice.int8_rows, choice.pack, choice.group_rows if bits else 0, bits or 4,
                      keep_dense=choice.keep_dense, kernels=kernels)
    setattr(model.get_submodule(parent), attr, layer)
    # An LM head tied to the embedding and served from int8 groups alone holds the embedding
    # too (exactly, where the checkpoint stored it as Q8_0): rows are looked up there and
    # the float32 table goes (vocab x hidden x 4 bytes: 108 MiB of SmolLM2's 135M parameters).
    if layer.weight is None and layer.group_max_rows == ALL_ROWS and layer.grouped.bits == 8:
        for embedding in tied:
            embedding.look_up_in(layer.grouped)


def use_cpu_linears(model: nn.Module, plan: SmallBatchWeights, dtype: torch.dtype, kernels=None) -> int:
    """Swap every remaining nn.Linear of a loaded float32 or bf16 model for a CpuLinear, then
    tune the band each GEMM serves; returns how many CpuLinears the model has."""
    choice = _linear_choice(plan, dtype)
    if choice is None:
        return 0
    for name in [name for name, module in model.named_modules() if type(module) is nn.Linear]:
        convert_linear(model, name, plan, dtype, kernels)
    layers = [m for m in model.modules() if isinstance(m, CpuLinear)]
    if choice.pack:
        tune_padding(layers)
    if plan.group_max_rows is None and choice.keep_dense:
        tune_group_rows([layer for layer in layers if layer.grouped is not None])
    return len(layers)


def _by_shape(layers: list[CpuLinear], sample_bytes: int, bytes_per_weight: float) -> dict[tuple, list[CpuLinear]]:
    # Each shape is timed on enough of its layers (up to sample_bytes of weights) that they
    # stream from memory, not from L2, as they do in a decode step: warm-cache timings point
    # the other way for small shapes.
    by_shape: dict[tuple, list[CpuLinear]] = {}
    for layer in layers:
        by_shape.setdefault((layer.out_features, layer.in_features), []).append(layer)
    return {shape: group[:max(1, min(len(group), int(sample_bytes // (bytes_per_weight * shape[0] * shape[1]))))]
            for shape, group in by_shape.items()}


def tune_padding(layers: list[CpuLinear], sample_bytes: int = 64 << 20) -> None:
    """Measure, per weight shape, from how many rows padding the packed GEMM pays and set it
    on every layer of that shape (~0.5 s per model)."""
    packed = [layer for layer in layers if layer.packed is not None]
    for (n, k), sample in _by_shape(packed, sample_bytes, 2).items():
        pad_from = measure_padding([layer.packed for layer in sample], k)
        log.info("packed bf16 GEMM %dx%d: %s", n, k,
                 f"batches of {pad_from} to {PAD_TO_ROWS - 1} rows padded to {PAD_TO_ROWS}" if pad_from else "no padding")
        for layer in packed:
            if (layer.out_features, layer.in_features) == (n, k):
                layer.pad_from_rows = pad_from


def tune_group_rows(layers: list[CpuLinear], sample_bytes: int = 64 << 20, rounds: int = 4) -> None:
    """bf16 models: measure, per weight shape, up to how many rows the grouped GEMM beats the dense one
    (of GROUP_ROW_CANDIDATES, each round's times compared within the round: the machine's
    speed drifts between rounds) and set it on every layer of that shape (~1 s per model)."""
    for (n, k), sample in _by_shape(layers, sample_bytes, 2).items():
        g = torch.Generator().manual_seed(0)
        xs = {rows: torch.randn(rows, k, generator=g).bfloat16() for rows in GROUP_ROW_CANDIDATES}
        ratios: dict[int, list[float]] = {rows: [] for rows in GROUP_ROW_CANDIDATES}
        for r in range(rounds + 1):  # round 0 warms up
            for rows, x in xs.items():
                grouped = _time(lambda: [group_quant_linear(x, l.grouped, l.bias, l.kernels) for l in sample])
                dense = _time(lambda: [l.dense(x) for l in sample])
                if r:
                    ratios[rows].append(grouped / dense)
        best = 0
        for rows in GROUP_ROW_CANDIDATES:  # the band the groups serve starts at one row
            if statistics.median(ratios[rows]) >= 1.0:
                break
            best = rows
        log.info("grouped GEMM %dx%d: serves batches of up to %d rows", n, k, best)
        for layer in layers:
            if (layer.out_features, layer.in_features) == (n, k):
                layer.group_max_rows = best
                if best == 0:  # the dense GEMM serves every batch: the groups would be dead weight
                    layer.grouped = None


def _time(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0
