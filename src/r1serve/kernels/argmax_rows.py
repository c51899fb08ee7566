"""Greedy sampling's argmax over the logits' rows, in one C++ pass (csrc/argmax_rows.cpp).

Twin: `argmax_rows_reference`, torch's argmax. Same answer, ties and NaNs included.
"""
from __future__ import annotations

import torch

from r1serve.kernels.cpu_extension import cpu_kernels


def argmax_rows_reference(logits: torch.Tensor) -> torch.Tensor:
    # logits: (B, V) -> (B,) int64
    return logits.argmax(dim=-1)


def argmax_rows(logits: torch.Tensor, kernels=None) -> torch.Tensor:
    """The kernel for contiguous float32 CPU logits where it is built, else the twin.
    kernels: the compiled module of one ISA (default: the CPU's best)."""
    kernels = (kernels or cpu_kernels()) if logits.device.type == "cpu" else None
    if kernels is None or logits.dtype != torch.float32 or logits.dim() != 2 or not logits.is_contiguous() \
            or logits.shape[1] == 0:
        return argmax_rows_reference(logits)
    return kernels.argmax_rows(logits)
