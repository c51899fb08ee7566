"""Fused MoE: one grouped GEMM over the tokens routed to each expert, bf16 or FP8 block-scaled.

The (token, slot) pairs of topk_ids (N tokens x K slots = P pairs) are sorted by expert and
each expert's run is padded to a whole number of BLOCK_M rows:

    sorted_ids   [ e0 e0 e0 P | e3 e3 P P | e7 ... ]   pair ids, P = padding (no pair)
    block_expert [    0       |    3      |  7  ... ]   one expert per BLOCK_M rows
    num_padded   total padded rows; blocks past it exit at once

so every (BLOCK_M, BLOCK_N) output tile multiplies rows of one expert by that expert's
weight: grid (max_blocks * cdiv(N_out, BLOCK_N)). The alignment runs as torch ops on the
device, with no host sync and static shapes (max_blocks is bounded by P and E), so a decode
step with MoE can be captured in a CUDA graph.

    gemm 1: h13[p] = x[p // K] @ w13[e].T         (P, 2I)   rows gathered per pair
    act:    a[p]   = silu(gate) * up               (P, I)
    gemm 2: h2[p]  = topk_weight[p] * a[p] @ w2[e].T   (P, hidden) float32
    out[t] = sum over its K pairs of h2             (N, hidden)

FP8: x and a are quantized per token and group of b1 columns (fp8_act_quant.py) and each
k-step's FP8 dot is scaled by x_scale[row, g] * w_scale[e, n // b0, g], as in fp8_gemm.py.

Twins: `fused_moe_reference` (kernels/fused_moe.py), `fused_moe_fp8_reference`
(kernels/fused_moe_fp8.py).
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
import triton
import triton.language as tl

from r1serve.kernels.triton import next_power_of_2
from r1serve.kernels.triton.fp8_act_quant import act_quant_triton
from r1serve.kernels.triton.fp8_gemm import check_fp8_weight

BLOCK_N = 64
BLOCK_K = 64  # bf16; FP8 steps one scale group (b1 = 128 for R1) at a time


def moe_align_block_size(topk_ids: torch.Tensor, num_experts: int,
                         block_m: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(sorted_ids (max_padded,), block_expert (max_padded / block_m,), num_padded (1,)); see above."""
    flat = topk_ids.reshape(-1).long()
    P = flat.numel()
    counts = torch.zeros(num_experts, dtype=torch.long, device=flat.device).scatter_add_(0, flat, torch.ones_like(flat))
    padded = (counts + block_m - 1) // block_m * block_m
    ends = padded.cumsum(0)  # (E,) end of each expert's padded run
    order = flat.argsort(stable=True)  # pairs grouped by expert, in token order within one
    expert = flat[order]
    rank = torch.arange(P, device=flat.device) - (counts.cumsum(0) - counts)[expert]  # index within its expert
    # At most min(E, P) experts have pairs, each wasting < block_m rows of padding.
    max_padded = -(-(P + min(num_experts, P) * (block_m - 1)) // block_m) * block_m
    sorted_ids = torch.full((max_padded,), P, dtype=torch.int32, device=flat.device)
    sorted_ids[(ends - padded)[expert] + rank] = order.to(torch.int32)
    block_start = torch.arange(0, max_padded, block_m, device=flat.device)
    block_expert = torch.searchsorted(ends, block_start, right=True).clamp(max=num_experts - 1).to(torch.int32)
    return sorted_ids, block_expert, ends[-1:].to(torch.int32)


@triton.jit
def _moe_gemm_kernel(a_ptr, w_ptr, out_ptr, a_scale_ptr, w_scale_ptr, topk_weights_ptr, sorted_ids_ptr,
                     block_expert_ptr, num_padded_ptr, num_pairs, N, K,
                     stride_a, stride_we, stride_wn, stride_out, stride_se, stride_sn,
                     A_ROW_DIV: tl.constexpr, MUL_WEIGHT: tl.constexpr, FP8: tl.constexpr, B0: tl.constexpr,
                     BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_K: tl.constexpr, PRECISION: tl.constexpr):
    pid = tl.program_id(0)
    num_n = tl.cdiv(N, BLOCK_N)
    pid_m, pid_n = pid // num_n, pid % num_n
    if pid_m * BLOCK_M >= tl.load(num_padded_ptr):
        return
    pairs = tl.load(sorted_ids_ptr + pid_m * BLOCK_M + tl.arange(0, BLOCK_M))
    valid = pairs < num_pairs
    rows = (pairs // A_ROW_DIV).to(tl.int64)  # the input row each pair reads
    expert = tl.load(block_expert_ptr + pid_m).to(tl.int64)
    cols = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    col_ok = cols < N
    ks = tl.arange(0, BLOCK_K)
    a_ptrs = a_ptr + rows[:, None] * stride_a + ks[None, :]  # (BLOCK_M, BLOCK_K)
    # w read as its (BLOCK_K, BLOCK_N) transpose: the tensor cores take K-major operands.
    w_ptrs = w_ptr + expert * stride_we + cols[None, :].to(tl.int64) * stride_wn + ks[:, None]
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for g in range(tl.cdiv(K, BLOCK_K)):
        k_ok = ks < K - g * BLOCK_K
        a = tl.load(a_ptrs, mask=valid[:, None] & k_ok[None, :], other=0.0)
        w = tl.load(w_ptrs, mask=k_ok[:, None] & col_ok[None, :], other=0.0)
        if FP8:
            a_s = tl.load(a_scale_ptr + rows * (K // BLOCK_K) + g, mask=valid, other=0.0)
            w_s = tl.load(w_scale_ptr + expert * stride_se + (cols // B0) * stride_sn + g, mask=col_ok, other=0.0)
            acc += tl.dot(a, w) * a_s[:, None] * w_s[None, :]
        else:
            acc = tl.dot(a, w, acc, input_precision=PRECISION)
        a_ptrs += BLOCK_K
        w_ptrs += BLOCK_K
    if MUL_WEIGHT:
        acc *= tl.load(topk_weights_ptr + pairs, mask=valid, other=0.0)[:, None]
    out_ptrs = out_ptr + pairs[:, None].to(tl.int64) * stride_out + cols[None, :]
    tl.store(out_ptrs, acc.to(out_ptr.dtype.element_ty), mask=valid[:, None] & col_ok[None, :])


def _block_m(num_pairs: int, num_experts: int) -> int:
    # Rows per tile ~ the average pairs per expert: decode batches give each expert a few
    # tokens, and a 64-row tile would be mostly padding.
    return min(64, max(16, next_power_of_2(-(-num_pairs // num_experts))))


def _grouped_gemm(a, w, out, align, num_pairs: int, a_row_div: int, topk_weights=None, a_scale=None, w_scale=None,
                  block: tuple[int, int] | None = None) -> None:
    sorted_ids, block_expert, num_padded = align
    block_m = sorted_ids.numel() // block_expert.numel()
    N, K = w.shape[1:]
    fp8 = a_scale is not None
    block_k = block[1] if fp8 else BLOCK_K
    grid = (block_expert.numel() * triton.cdiv(N, BLOCK_N),)
    # Pointers a variant never reads (scales without FP8, weights without MUL_WEIGHT) are
    # given as `a`: the constexpr flags compile those loads away.
    _moe_gemm_kernel[grid](
        a, w, out, a_scale if fp8 else a, w_scale if fp8 else w, topk_weights if topk_weights is not None else a,
        sorted_ids, block_expert, num_padded, num_pairs, N, K,
        a.stride(0), w.stride(0), w.stride(1), out.stride(0),
        w_scale.stride(0) if fp8 else 0, w_scale.stride(1) if fp8 else 0,
        A_ROW_DIV=a_row_div, MUL_WEIGHT=topk_weights is not None, FP8=fp8, B0=block[0] if fp8 else 1,
        BLOCK_M=block_m, BLOCK_N=BLOCK_N, BLOCK_K=block_k,
        PRECISION="ieee" if a.dtype == torch.float32 else "tf32")


def _check_routing(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, hidden: int) -> None:
    assert x.dim() == 2 and x.is_contiguous() and x.shape[1] == hidden, f"x {tuple(x.shape)} must be (N, {hidden})"
    assert topk_ids.dim() == 2 and topk_ids.shape[0] == x.shape[0], f"topk_ids {tuple(topk_ids.shape)} for N={x.shape[0]}"
    assert topk_weights.shape == topk_ids.shape and topk_weights.dtype == torch.float32, \
        "topk_weights: float32, shaped like topk_ids"
    assert topk_weights.device == topk_ids.device == x.device, "tensors on different devices"


def _combine(h2: torch.Tensor, N: int, K: int, dtype: torch.dtype) -> torch.Tensor:
    # (N*K, hidden) float32, already weighted -> (N, hidden): each token's K slots summed
    return h2.view(N, K, -1).sum(dim=1).to(dtype)


def fused_moe_triton(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                     topk_ids: torch.Tensor) -> torch.Tensor:
    # x: (N, hidden); w13: (E, 2I, hidden); w2: (E, hidden, I); topk_*: (N, K) -> (N, hidden)
    E, two_i, hidden = w13.shape
    _check_routing(x, topk_weights, topk_ids, hidden)
    assert w2.shape == (E, hidden, two_i // 2), f"w2 {tuple(w2.shape)} does not match w13 {tuple(w13.shape)}"
    assert w13.dtype == w2.dtype == x.dtype and w13.is_contiguous() and w2.is_contiguous(), "weights: x's dtype, contiguous"
    N, K = topk_ids.shape
    P = N * K
    align = moe_align_block_size(topk_ids, E, _block_m(P, E))
    h13 = torch.empty(P, two_i, dtype=x.dtype, device=x.device)
    h2 = torch.empty(P, hidden, dtype=torch.float32, device=x.device)
    if N:
        _grouped_gemm(x, w13, h13, align, P, K)
        gate, up = h13.chunk(2, dim=-1)
        _grouped_gemm((F.silu(gate) * up).contiguous(), w2, h2, align, P, 1, topk_weights.reshape(-1))
    return _combine(h2, N, K, x.dtype)


def fused_moe_fp8_triton(x: torch.Tensor, w13: torch.Tensor, w13_scale: torch.Tensor, w2: torch.Tensor,
                         w2_scale: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor,
                         block: tuple[int, int]) -> torch.Tensor:
    # as fused_moe_triton, weights float8 with per-(b0 x b1)-block scales -> (N, hidden) in x's dtype
    E, two_i, hidden = w13.shape
    _check_routing(x, topk_weights, topk_ids, hidden)
    assert w2.shape == (E, hidden, two_i // 2), f"w2 {tuple(w2.shape)} does not match w13 {tuple(w13.shape)}"
    check_fp8_weight(w13, w13_scale, block)
    check_fp8_weight(w2, w2_scale, block)
    N, K = topk_ids.shape
    P = N * K
    align = moe_align_block_size(topk_ids, E, _block_m(P, E))
    h13 = torch.empty(P, two_i, dtype=x.dtype, device=x.device)
    h2 = torch.empty(P, hidden, dtype=torch.float32, device=x.device)
    if N:
        x_q, x_s = act_quant_triton(x, block[1])
        _grouped_gemm(x_q, w13, h13, align, P, K, a_scale=x_s, w_scale=w13_scale, block=block)
        gate, up = h13.chunk(2, dim=-1)
        a_q, a_s = act_quant_triton((F.silu(gate) * up).contiguous(), block[1])
        _grouped_gemm(a_q, w2, h2, align, P, 1, topk_weights.reshape(-1), a_scale=a_s, w_scale=w2_scale, block=block)
    return _combine(h2, N, K, x.dtype)
