"""RMSNorm, with the residual add fused in as the decoder layers use it."""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None):
        """Without residual: norm(x). With it: (norm(x + residual), x + residual)."""
        if residual is not None:
            x = x + residual
            residual = x
        dtype = x.dtype
        # Normalise in float32, as the reference implementation does, then cast back.
        h = F.rms_norm(x.float(), (x.shape[-1],), eps=self.eps)
        out = self.weight * h.to(dtype)
        return out if residual is None else (out, residual)
