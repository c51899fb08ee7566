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


def fused_moe_fp8_reference(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                            w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                            block: tuple[int, int]) -> torch.Tensor:
    # x: (N, hidden); topk_weights (float32), topk_ids: (N, K) -> (N, hidden)
    N, K = topk_ids.shape
    flat = topk_ids.reshape(-1)
    order = flat.argsort(stable=True)  # (token, slot) pairs grouped by expert
    token = order // K
    counts = torch.bincount(flat, minlength=w13.shape[0]).tolist()
    xs = x[token]  # (N*K, hidden)
    out = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n:
            gate, up = fp8_linear_reference(xs[start:start + n], w13[e], w13_scale[e], block).chunk(2, dim=-1)
            out[start:start + n] = fp8_linear_reference(F.silu(gate) * up, w2[e], w2_scale[e], block)
            start += n
    weighted = out.float() * topk_weights.reshape(-1)[order, None]
    return torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, token, weighted).to(x.dtype)
