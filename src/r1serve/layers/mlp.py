"""The gated MLP of Llama, Qwen2 and DeepSeek's dense layers and shared experts:
down(silu(gate(x)) * up(x)), with gate and up fused into one GEMM."""
from __future__ import annotations

import torch
from torch import nn

from r1serve.layers.activation import SiluAndMul


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int) -> None:
        super().__init__()
        self.gate_up_proj = nn.Linear(hidden, 2 * intermediate, bias=False)  # rows [gate | up]
        self.act = SiluAndMul()  # silu(gate) * up
        self.down_proj = nn.Linear(intermediate, hidden, bias=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, hidden) -> (N, 2I) -> (N, I) -> (N, hidden)
        return self.down_proj(self.act(self.gate_up_proj(x)))
