"""Linears and routed experts whose weights stay in R1's FP8 block format (kernels/fp8_block.py).

On a GPU with FP8 tensor cores (Hopper and newer) keeping the checkpoint's FP8 weights halves
weight memory and weight traffic against bf16, and the GEMM runs at the FP8 rate: inputs are
quantized per token and group of b1 columns, and the block-scaled FP8 GEMM applies both scales
(kernels/fp8_gemm.py). `platforms/cuda/fp8_weights.py` swaps these in for a loaded model.

`fp8_act_quant` and `fp8_block_gemm` default to the plain-torch twins; the cuda platform's
bind sets the Triton kernels.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from r1serve.kernels.fp8_gemm import act_quant_reference, fp8_block_gemm_reference
from r1serve.kernels.fused_moe_fp8 import fused_moe_fp8_reference

# (x_q, x_scale, weight, weight_scale_inv, block, out_dtype) -> (M, N)
Fp8Gemm = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, tuple[int, int], torch.dtype], torch.Tensor]
# (x, group) -> (x_q, x_scale)
ActQuant = Callable[[torch.Tensor, int], tuple[torch.Tensor, torch.Tensor]]


class Fp8BlockLinear(nn.Module):
    kernel_ops = ("fp8_act_quant", "fp8_block_gemm")  # what a platform's bind may swap (platforms/base.py)

    def __init__(self, weight: torch.Tensor, weight_scale_inv: torch.Tensor, block: tuple[int, int],
                 bias: torch.Tensor | None = None) -> None:
        super().__init__()
        if weight.shape[1] % block[1]:
            raise ValueError(f"an FP8 linear needs in_features ({weight.shape[1]}) to be a multiple of the "
                             f"column block {block[1]}: activations are quantized in groups of it")
        self.register_buffer("weight", weight)  # (out, in) float8_e4m3fn
        self.register_buffer("weight_scale_inv", weight_scale_inv)  # (ceil(out / b0), in / b1) float32
        self.bias = None if bias is None else nn.Parameter(bias.detach(), requires_grad=False)
        self.block = block
        self.fp8_act_quant: ActQuant = act_quant_reference
        self.fp8_block_gemm: Fp8Gemm = fp8_block_gemm_reference

    @property
    def in_features(self) -> int:
        return self.weight.shape[1]

    @property
    def out_features(self) -> int:
        return self.weight.shape[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # x: (..., in) -> (..., out) in x's dtype
        rows = x.reshape(-1, self.in_features).contiguous()
        x_q, x_scale = self.fp8_act_quant(rows, self.block[1])
        y = self.fp8_block_gemm(x_q, x_scale, self.weight, self.weight_scale_inv, self.block, x.dtype)
        if self.bias is not None:
            y = y + self.bias
        return y.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, block={self.block}"


# (x, w13, w13_scale, w2, w2_scale, topk_weights, topk_ids, block) -> (N, hidden)
Fp8MoE = Callable[..., torch.Tensor]


class Fp8Experts(nn.Module):
    """DeepseekMoE's moe_experts with FP8 weights: called as moe_experts(x, w13, w2, weights,
    ids), it ignores the (emptied) bf16 w13 / w2 it is handed and uses its own."""

    kernel_ops = ("fp8_moe",)

    def __init__(self, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor, w2_scale: torch.Tensor,
                 block: tuple[int, int]) -> None:
        super().__init__()
        self.register_buffer("w13", w13)  # (E, 2I, hidden) float8
        self.register_buffer("w13_scale", w13_scale)
        self.register_buffer("w2", w2)  # (E, hidden, I) float8
        self.register_buffer("w2_scale", w2_scale)
        self.block = block
        self.fp8_moe: Fp8MoE = fused_moe_fp8_reference

    def forward(self, x: torch.Tensor, _w13, _w2, topk_weights: torch.Tensor, topk_ids: torch.Tensor) -> torch.Tensor:
        return self.fp8_moe(x, self.w13, self.w13_scale, self.w2, self.w2_scale, topk_weights, topk_ids, self.block)
