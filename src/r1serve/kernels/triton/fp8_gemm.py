"""FP8 block-scaled GEMM (DeepSeek's fp8_gemm): y = x @ w.T with both operands in FP8.

    x_q (M, K) float8, x_scale (M, K / b1)             per token and group of b1 columns
    w   (N, K) float8, w_scale (ceil(N / b0), K / b1)    per b0 x b1 weight block (R1: 128 x 128)
    y   (M, N) bf16 / fp16 / fp32

Grid (cdiv(M, BLOCK_M), cdiv(N, BLOCK_N)). A program walks K one scale group (BLOCK_K = b1)
at a time: an FP8 x FP8 tensor-core dot into a float32 tile, which is then scaled by the
group's x_scale (one per row) and w_scale (one per column, w_scale[n // b0]) and added to the
accumulator. Partial weight blocks at the bottom edge (R1's 576-row kv_a_proj) are masked.

Twin: `fp8_block_gemm_reference` (kernels/fp8_gemm.py).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from r1serve.kernels.triton import next_power_of_2

BLOCK_N = 128


@triton.jit
def _fp8_gemm_kernel(x_ptr, xs_ptr, w_ptr, ws_ptr, y_ptr, M, N, K: tl.constexpr, stride_ws: tl.constexpr,
                     B0: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr):
    pid_m, pid_n = tl.program_id(0), tl.program_id(1)
    rows = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    ks = tl.arange(0, BLOCK_K)
    row_ok, col_ok = rows < M, cols < N
    x_ptrs = x_ptr + rows[:, None].to(tl.int64) * K + ks[None, :]  # (BLOCK_M, BLOCK_K)
    # w read as its (BLOCK_K, BLOCK_N) transpose: the FP8 tensor cores take K-major operands.
    w_ptrs = w_ptr + cols[None, :].to(tl.int64) * K + ks[:, None]
    xs_ptrs = xs_ptr + rows * (K // BLOCK_K)
    ws_ptrs = ws_ptr + (cols // B0) * stride_ws
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for g in range(K // BLOCK_K):
        x = tl.load(x_ptrs, mask=row_ok[:, None], other=0.0)
        w = tl.load(w_ptrs, mask=col_ok[None, :], other=0.0)
        x_s = tl.load(xs_ptrs + g, mask=row_ok, other=0.0)
        w_s = tl.load(ws_ptrs + g, mask=col_ok, other=0.0)
        acc += tl.dot(x, w) * x_s[:, None] * w_s[None, :]
        x_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    y_ptrs = y_ptr + rows[:, None].to(tl.int64) * N + cols[None, :]
    tl.store(y_ptrs, acc.to(y_ptr.dtype.element_ty), mask=row_ok[:, None] & col_ok[None, :])


def check_fp8_weight(weight: torch.Tensor, weight_scale_inv: torch.Tensor, block: tuple[int, int]) -> None:
    # weight: (..., N, K) float8; scales (..., ceil(N / b0), K / b1), both contiguous
    N, K = weight.shape[-2:]
    b0, b1 = block
    assert weight.dtype == torch.float8_e4m3fn and weight.is_contiguous(), "weight must be contiguous float8_e4m3fn"
    assert weight_scale_inv.dtype == torch.float32 and weight_scale_inv.is_contiguous(), "scales: contiguous float32"
    assert K % b1 == 0, f"K={K} must be a whole number of {b1}-column blocks"
    assert weight_scale_inv.shape == (*weight.shape[:-2], -(-N // b0), K // b1), \
        f"weight {tuple(weight.shape)} in {block} blocks needs scales {(-(-N // b0), K // b1)}, " \
        f"got {tuple(weight_scale_inv.shape)}"


def fp8_block_gemm_triton(x_q: torch.Tensor, x_scale: torch.Tensor, weight: torch.Tensor,
                          weight_scale_inv: torch.Tensor, block: tuple[int, int], out_dtype: torch.dtype) -> torch.Tensor:
    # x_q (M, K) float8 with x_scale (M, K / b1); weight (N, K) float8 -> (M, N) out_dtype
    M, K = x_q.shape
    N = weight.shape[0]
    b0, b1 = block
    assert weight.dim() == 2 and weight.shape[1] == K, f"x {tuple(x_q.shape)} against weight {tuple(weight.shape)}"
    assert x_q.dtype == torch.float8_e4m3fn and x_q.is_contiguous(), "x_q must be contiguous float8_e4m3fn"
    assert x_scale.shape == (M, K // b1) and x_scale.dtype == torch.float32 and x_scale.is_contiguous()
    assert b1 >= 16 and b1 & (b1 - 1) == 0, f"column block {b1} must be a power of two >= 16 (one k-tile)"
    check_fp8_weight(weight, weight_scale_inv, block)
    y = torch.empty(M, N, dtype=out_dtype, device=x_q.device)
    if M == 0:
        return y
    block_m = min(64, max(16, next_power_of_2(M)))  # decode batches are a few rows: no idle 64-row tiles
    grid = (triton.cdiv(M, block_m), triton.cdiv(N, BLOCK_N))
    _fp8_gemm_kernel[grid](x_q, x_scale, weight, weight_scale_inv, y, M, N, K=K,
                           stride_ws=weight_scale_inv.stride(0), B0=b0, BLOCK_M=block_m, BLOCK_N=BLOCK_N,
                           BLOCK_K=b1, num_stages=3)
    return y
