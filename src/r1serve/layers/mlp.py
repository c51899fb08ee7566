"""The gated MLP of Llama, Qwen2 and DeepSeek's dense layers and shared experts:
down(silu(gate(x)) * up(x)), with gate and up fused into one GEMM.

Under tensor parallelism a rank holds intermediate / size of the columns; the down
projection's partial sums meet in one all-reduce, unless the caller sums them with others
first (`reduce=False`: the MoE adds its shared experts to its routed ones before one
all-reduce)."""
from __future__ import annotations

import torch
from torch import nn

from r1serve.parallel.tensor_parallel import TensorParallel
from r1serve.layers.activation import SiluAndMul


class GatedMLP(nn.Module):
    def __init__(self, hidden: int, intermediate: int, tp: TensorParallel = TensorParallel(),
                 reduce: bool = True) -> None:
        super().__init__()
        i0, i1 = tp.split(intermediate, "intermediate_size")
        self.gate_up_proj = nn.Linear(hidden, 2 * (i1 - i0), bias=False)  # rows [gate | up]
        self.act = SiluAndMul()  # silu(gate) * up
        self.down_proj = nn.Linear(i1 - i0, hidden, bias=False)
        self.tp = tp if reduce else TensorParallel()  # a group of one: the identity

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (N, hidden) -> (N, 2I/size) -> (N, I/size) -> (N, hidden), summed over the ranks
        return self.tp.all_reduce(self.down_proj(self.act(self.gate_up_proj(x))))
