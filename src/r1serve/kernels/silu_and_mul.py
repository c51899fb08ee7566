"""silu(gate) * up over the fused gate/up projection, in one C++ pass (csrc/silu_and_mul.cpp).

Twin: `silu_and_mul_reference`, the MLP's own torch code. The kernel's exp is its own
polynomial (within ~2 float32 ulp), not torch's, so float32 results differ in the
last bits and bf16 ones, rarely, in the last bit.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from r1serve.kernels.cpu_extension import cpu_kernels


def silu_and_mul_reference(x: torch.Tensor) -> torch.Tensor:
    # x: (N, 2I) [gate | up] -> (N, I)
    gate, up = x.chunk(2, dim=-1)
    return F.silu(gate) * up


def silu_and_mul(x: torch.Tensor, kernels=None) -> torch.Tensor:
    # kernels: the compiled module of one ISA (default: the CPU's best); the C++ checks the
    # shape and contiguity, with a message.
    return (kernels or cpu_kernels()).silu_and_mul(x)
