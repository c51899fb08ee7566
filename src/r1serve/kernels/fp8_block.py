"""DeepSeek-V3/R1's FP8 weight format: float8 e4m3 weights with one float32 scale per block.

    weight             (out, in)                                  float8_e4m3fn
    weight_scale_inv   (ceil(out / b0), ceil(in / b1))             float32, b0 x b1 = 128 x 128 in R1

The real weight is weight * weight_scale_inv of its block; blocks at the right and bottom
edges may be partial, as R1's own loader allows. Platforms without FP8 matmuls dequantize
while loading, one tensor at a time.
"""
from __future__ import annotations

import torch

FP8_MAX = 448.0  # largest finite float8_e4m3fn


def _expand(scale: torch.Tensor, shape: torch.Size, block: tuple[int, int]) -> torch.Tensor:
    # (ceil(out/b0), ceil(in/b1)) -> (out, in), each scale repeated over its block
    return scale.repeat_interleave(block[0], 0)[:shape[0]].repeat_interleave(block[1], 1)[:, :shape[1]]


def dequantize_fp8_block(weight: torch.Tensor, scale_inv: torch.Tensor, block: tuple[int, int]) -> torch.Tensor:
    rows, cols = -(-weight.shape[0] // block[0]), -(-weight.shape[1] // block[1])
    if tuple(scale_inv.shape) != (rows, cols):
        raise ValueError(f"weight {tuple(weight.shape)} in {block} blocks needs scales of shape {(rows, cols)}, "
                         f"got {tuple(scale_inv.shape)}")
    return weight.float() * _expand(scale_inv.float(), weight.shape, block)  # (out, in) float32


def quantize_fp8_block(weight: torch.Tensor, block: tuple[int, int]) -> tuple[torch.Tensor, torch.Tensor]:
    """(weight in float8 e4m3, weight_scale_inv): each block scaled so its largest value is FP8_MAX."""
    rows, cols = -(-weight.shape[0] // block[0]), -(-weight.shape[1] // block[1])
    padded = weight.float().new_zeros(rows * block[0], cols * block[1])
    padded[:weight.shape[0], :weight.shape[1]] = weight.float()
    amax = padded.view(rows, block[0], cols, block[1]).abs().amax(dim=(1, 3))  # (rows, cols)
    scale_inv = (amax / FP8_MAX).clamp(min=1e-12)
    q = (weight.float() / _expand(scale_inv, weight.shape, block)).to(torch.float8_e4m3fn)
    return q, scale_inv
