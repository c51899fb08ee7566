"""RMSNorm, with the residual add fused in as the decoder layers use it."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from r1serve.kernels.rms_norm import add_rms_norm_reference

# (x or None, residual, weight, eps) -> (normed, new residual); a platform may swap in a fused kernel.
AddRMSNormImpl = Callable[[torch.Tensor | None, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    kernel_ops = ("add_rms_norm",)  # what a platform's bind may swap (platforms/base.py)

    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.add_rms_norm: AddRMSNormImpl = add_rms_norm_reference

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With it: (norm(x + residual), x + residual)."""
        if residual is None:
            return self.add_rms_norm(None, x, self.weight, self.eps)[0]
        return self.add_rms_norm(x, residual, self.weight, self.eps)
