"""Routed experts: every token's top-k experts, computed expert by expert.

Tokens are grouped by expert (one sort of the (token, expert) pairs), each expert runs one
GEMM over all the tokens routed to it, and the weighted results are summed back per token.
Python loops over experts with work, never over tokens. This plain-torch form is the twin
a platform's fused MoE kernel is tested against.

    w13: (E, 2I, hidden)  gate and up projections of every expert, stacked
    w2:  (E, hidden, I)   down projections
"""
from __future__ import annotations

from typing import Callable

import torch
import torch.nn.functional as F


def fused_moe_reference(x: torch.Tensor, w13: torch.Tensor, w2: torch.Tensor, topk_weights: torch.Tensor,
                        topk_ids: torch.Tensor) -> torch.Tensor:
    # x: (N, hidden); topk_weights (float32), topk_ids: (N, K) -> (N, hidden)
    def expert(e: int, rows: torch.Tensor) -> torch.Tensor:
        gate, up = F.linear(rows, w13[e]).chunk(2, dim=-1)
        return F.linear(F.silu(gate) * up, w2[e])

    return experts_by_group(x, topk_weights, topk_ids, w13.shape[0], expert)


def experts_by_group(x: torch.Tensor, topk_weights: torch.Tensor, topk_ids: torch.Tensor, num_experts: int,
                     expert: Callable[[int, torch.Tensor], torch.Tensor]) -> torch.Tensor:
    """Group the (token, slot) pairs by expert, run `expert(e, rows)` once per expert with
    work, and sum the weighted results back per token (in float32)."""
    N, K = topk_ids.shape
    flat = topk_ids.reshape(-1)  # (N*K,) expert of each (token, slot) pair
    order = flat.argsort(stable=True)  # pairs grouped by expert
    token = order // K  # (N*K,) the token of each grouped pair
    counts = torch.bincount(flat, minlength=num_experts).tolist()
    xs = x[token]  # (N*K, hidden)
    out = torch.empty_like(xs)
    start = 0
    for e, n in enumerate(counts):
        if n:
            out[start:start + n] = expert(e, xs[start:start + n])
            start += n
    weighted = out.float() * topk_weights.reshape(-1)[order, None]
    return torch.zeros(N, x.shape[1], dtype=torch.float32, device=x.device).index_add_(0, token, weighted).to(x.dtype)
