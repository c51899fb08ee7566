"""Routed experts with R1's FP8 block-scaled weights: the plain-torch twin of the FP8 fused MoE.

    w13: (E, 2I, hidden) float8, w13_scale (E, 2I / b0, hidden / b1)
    w2:  (E, hidden, I)  float8, w2_scale  (E, hidden / b0, I / b1)

The same expert-by-expert loop as `fused_moe_reference`, each GEMM as DeepSeek runs it:
activations quantized to FP8 per token and group of b1 columns, then the block-scaled FP8
GEMM (kernels/fp8_gemm.py). Quantization is per row, so quantizing x before or after the
rows are grouped by expert gives the same values, which lets the kernel quantize x once.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from r1serve.kernels.fp8_gemm import fp8_linear_reference
from r1serve.kernels.fused_moe import experts_by_group


def fused_moe_fp8_reference(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                            w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                            block: tuple[int, int]) -> torch.Tensor:
    # x: (N, hidden); topk_weights (float32), topk_ids: (N, K) -> (N, hidden)
    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up = fp8_linear_reference(rows, w13[e], w13_scale[e], block).chunk(2, dim=-1)
        return fp8_linear_reference(F.silu(gate) * up, w2[e], w2_scale[e], block)

    return experts_by_group(x, topk_weights, topk_ids, w13.shape[0], expert)
