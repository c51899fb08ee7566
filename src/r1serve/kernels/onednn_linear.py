"""bf16 GEMM through oneDNN with the weight packed once, ahead of time.

`F.linear` hands oneDNN a plain row-major weight and oneDNN reorders it into its blocked
layout (the one AMX / AVX512-BF16 tiles read) on every call. Packing once at load time
removes that per-call reorder; the result is bit-identical to `F.linear` in bf16 (tested).

Twin: `torch.nn.functional.linear` on the unpacked weight.
"""
from __future__ import annotations

import statistics
import time

import torch

# Below 33 rows oneDNN picks other kernels than its AMX bf16 ones, and for some weight
# shapes they measured 1.3-2x slower than the same GEMM padded to 33 rows (the weights are
# read once either way; the padding rows' arithmetic is nearly free). Which shapes, and from
# how many rows, differs by shape and machine, so it is measured at load (measure_padding).
PAD_TO_ROWS = 33
CANDIDATE_ROWS = (8, 16, 24, 32)


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


def measure_padding(weights: list[torch.Tensor], k: int, rounds: int = 6) -> int:
    """The smallest of CANDIDATE_ROWS from which padding batches to PAD_TO_ROWS rows is
    clearly (> 10%) faster for these packed weights of one shape, or 0 (never pad).

    Interleaved rounds over several layers' weights, so the timing streams them from memory
    as a decode step does rather than from a warm cache; each round's times are compared
    with the same round's padded time (the machine's speed drifts between rounds)."""
    g = torch.Generator().manual_seed(0)
    xs = {rows: torch.randn(rows, k, generator=g).bfloat16() for rows in CANDIDATE_ROWS + (PAD_TO_ROWS,)}
    ratios: dict[int, list[float]] = {rows: [] for rows in CANDIDATE_ROWS}
    for r in range(rounds + 1):  # round 0 warms up
        t: dict[int, float] = {}
        for rows, x in xs.items():
            t0 = time.perf_counter()
            for w in weights:
                packed_linear(x, w, None)
            t[rows] = time.perf_counter() - t0
        for rows in CANDIDATE_ROWS if r else ():
            ratios[rows].append(t[rows] / t[PAD_TO_ROWS])
    pad_from = 0
    for rows in reversed(CANDIDATE_ROWS):  # the band that pays must reach up to 32 rows
        if statistics.median(ratios[rows]) <= 1.1:
            break
        pad_from = rows
    return pad_from
