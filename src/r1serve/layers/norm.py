"""RMSNorm, with the residual add fused in as the decoder layers use it."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from r1serve.kernels.rms_norm import add_rms_norm_reference

# (x or None, residual, weight, eps) -> (normed, new residual); a platform may swap in a fused kernel.
AddRMSNormImpl = Callable[[torch.Tensor | None, torch.Tensor, torch.Tensor, float], tuple[torch.Tensor, torch.Tensor]]


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps
        self.impl: AddRMSNormImpl = add_rms_norm_reference

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With it: (norm(x + residual), x + residual)."""
        if residual is None:
            return self.impl(None, x, self.weight, self.eps)[0]
        return self.impl(x, residual, self.weight, self.eps)
