"""Residual add + RMSNorm fused into one pass (csrc/rms_norm.cpp) for the CPU.

Eagerly, the norm is seven small ops per call (cast, square, mean, add, rsqrt, multiply,
cast back) plus the residual add; on a small model at batch 1 those dominate the time of
the norms themselves. Twin: `add_rms_norm_reference`, the layer's own torch code.
"""
from __future__ import annotations

import torch

from r1serve.kernels.cpu_extension import cpu_kernels


def add_rms_norm_reference(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor,
                           eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    # x, residual: (N, D) -> (norm(x + residual), x + residual); x None: norm(residual)
    h = residual if x is None else x + residual
    normed = torch.nn.functional.rms_norm(h.float(), (h.shape[-1],), eps=eps).to(h.dtype)
    return weight * normed, h


def add_rms_norm(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor, eps: float,
                 kernels=None) -> tuple[torch.Tensor, torch.Tensor]:
    # kernels: the compiled module of one ISA (default: the CPU's best); the C++ checks
    # shapes, dtypes and contiguity, with messages.
    return (kernels or cpu_kernels()).add_rms_norm(x, residual, weight, eps)  # a tuple already
