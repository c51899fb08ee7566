"""The gated MLP's activation: silu(gate) * up over the fused gate/up projection."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from r1serve.kernels.silu_and_mul import silu_and_mul_reference

# (N, 2I) [gate | up] -> (N, I); a platform may swap in a fused kernel.
SiluAndMulImpl = Callable[[torch.Tensor], torch.Tensor]


class SiluAndMul(nn.Module):
    kernel_ops = ("silu_and_mul",)  # what a platform's bind may swap (platforms/base.py)

    def __init__(self) -> None:
        super().__init__()
        self.silu_and_mul: SiluAndMulImpl = silu_and_mul_reference

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.silu_and_mul(x)
