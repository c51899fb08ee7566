"""DeepSeekMoE: a router picks top-k routed experts per token, shared experts see every token.

Routing as DeepSeek-V3 trains it (noaux_tc): sigmoid scores; a per-expert bias
(e_score_correction_bias) shifts which experts are *chosen* but not the weights they get;
choice is limited to the topk_group best of n_group expert groups (a group scores the sum
of its two best experts); the chosen scores are normalised (norm_topk_prob) and scaled by
routed_scaling_factor. Older DeepSeek-V2 checkpoints use softmax scores and plain top-k
("greedy").

Two ways to spread the experts over a tensor-parallel group (every rank sees every token,
as attention leaves them replicated):

    tensor-parallel experts: each rank holds moe_intermediate_size / size columns of every
        expert (and of the shared experts); the partial sums meet in one all-reduce.
    expert parallelism: each rank holds n_routed_experts / size whole experts. The router
        runs on every rank alike; a rank dispatches to its experts the (token, slot) pairs
        routed to them, and the all-reduce combines the ranks' results (all-gather +
        reduce-scatter, with the tokens already gathered). Shared experts are replicated
        and added after the all-reduce.
    DP attention: the ranks are data-parallel replicas, each with its own tokens; those
        are all-gathered first, then as expert parallelism, each rank keeping its rows.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from r1serve.parallel.tensor_parallel import TensorParallel
from r1serve.errors import ModelLoadError
from r1serve.kernels.fused_moe import fused_moe_reference
from r1serve.layers.mlp import GatedMLP


@dataclass(frozen=True)
class MoEConfig:
    hidden_size: int
    moe_intermediate_size: int
    n_routed_experts: int
    n_shared_experts: int
    num_experts_per_tok: int
    n_group: int
    topk_group: int
    norm_topk_prob: bool
    routed_scaling_factor: float
    scoring_func: str = "sigmoid"
    topk_method: str = "noaux_tc"

    def __post_init__(self) -> None:
        if self.scoring_func not in ("sigmoid", "softmax"):
            raise ModelLoadError(f"MoE scoring_func {self.scoring_func!r} is not supported; use sigmoid or softmax")
        if self.topk_method not in ("noaux_tc", "greedy", "group_limited_greedy"):
            raise ModelLoadError(f"MoE topk_method {self.topk_method!r} is not supported; "
                                 "use noaux_tc, greedy or group_limited_greedy")
        if self.n_routed_experts % self.n_group:
            raise ModelLoadError(f"n_routed_experts={self.n_routed_experts} is not a multiple of n_group={self.n_group}")


class MoERouter(nn.Module):
    def __init__(self, c: MoEConfig) -> None:
        super().__init__()
        self.c = c
        # float32 whatever the model dtype, as the checkpoint and the reference keep them.
        self.weight = nn.Parameter(torch.empty(c.n_routed_experts, c.hidden_size, dtype=torch.float32))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(c.n_routed_experts, dtype=torch.float32))

    def init_buffers(self) -> None:
        # The loader casts the whole model to its dtype; routing stays in float32 (a bf16 bias
        # of ~1e-3 against scores near 0.5 would change which experts are chosen).
        device = self.weight.device
        self.weight = nn.Parameter(torch.empty(self.weight.shape, dtype=torch.float32, device=device))
        self.e_score_correction_bias = nn.Parameter(torch.zeros(self.c.n_routed_experts, dtype=torch.float32,
                                                                device=device))

    def forward(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        # x: (N, hidden) -> weights (N, K) float32, expert ids (N, K)
        c = self.c
        logits = F.linear(x.float(), self.weight.float())  # (N, E)
        scores = logits.sigmoid() if c.scoring_func == "sigmoid" else logits.softmax(dim=-1)
        choice = scores + self.e_score_correction_bias.float() if c.topk_method == "noaux_tc" else scores
        if c.topk_method != "greedy" and c.n_group > 1:
            choice = self._limit_groups(choice)
        ids = torch.topk(choice, k=c.num_experts_per_tok, dim=-1, sorted=False)[1]
        weights = scores.gather(1, ids)
        if c.norm_topk_prob:
            weights = weights / (weights.sum(dim=-1, keepdim=True) + 1e-20)
        return weights * c.routed_scaling_factor, ids

    def _limit_groups(self, choice: torch.Tensor) -> torch.Tensor:
        c, N = self.c, choice.shape[0]
        grouped = choice.view(N, c.n_group, -1)  # (N, G, E/G)
        if c.topk_method == "noaux_tc":
            group_scores = grouped.topk(2, dim=-1)[0].sum(dim=-1)  # (N, G): the two best experts of each group
        else:
            group_scores = grouped.max(dim=-1).values
        keep = torch.topk(group_scores, k=c.topk_group, dim=-1, sorted=False)[1]
        mask = torch.zeros_like(group_scores, dtype=torch.bool).scatter_(1, keep, True)  # (N, G)
        return grouped.masked_fill(~mask[..., None], float("-inf")).view(N, -1)


class DeepseekMoE(nn.Module):
    kernel_ops = ("moe_experts",)  # what a platform's bind may swap (platforms/base.py)

    def __init__(self, c: MoEConfig, tp: TensorParallel = TensorParallel()) -> None:
        super().__init__()
        self.c, self.tp = c, tp
        I, Hd = c.moe_intermediate_size, c.hidden_size
        self.gate = MoERouter(c)
        ep = tp.is_parallel and tp.expert_parallel
        self.experts = tp.split(c.n_routed_experts, "n_routed_experts") if ep else (0, c.n_routed_experts)
        E, I_rank = self.experts[1] - self.experts[0], I if ep else I // tp.size
        if not ep:
            tp.split(I, "moe_intermediate_size")  # refuses a size that does not divide it
        self.w13 = nn.Parameter(torch.empty(E, 2 * I_rank, Hd))  # experts.{e}.gate_proj / up_proj
        self.w2 = nn.Parameter(torch.empty(E, Hd, I_rank))  # experts.{e}.down_proj
        shared_tp = TensorParallel() if ep else tp  # replicated under expert parallelism
        self.shared_experts = GatedMLP(Hd, I * c.n_shared_experts, shared_tp, reduce=False) if c.n_shared_experts else None
        self.moe_experts = fused_moe_reference  # (x, w13, w2, weights, ids) -> (N, hidden)

    @property
    def is_expert_parallel(self) -> bool:
        return self.experts[1] - self.experts[0] < self.c.n_routed_experts

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.tp.dp_attention:
            return self._across_replicas(x)
        weights, ids = self.gate(x)
        if self.is_expert_parallel:
            out = self.tp.all_reduce(self._local_experts(x, weights, ids))
            return out if self.shared_experts is None else out + self.shared_experts(x)
        out = self.moe_experts(x, self.w13, self.w2, weights, ids)
        out = out if self.shared_experts is None else out + self.shared_experts(x)
        return self.tp.all_reduce(out)

    def _across_replicas(self, x: torch.Tensor) -> torch.Tensor:
        # x: (n_r, hidden), this replica's tokens. Dispatch as an all-gather of every
        # replica's tokens (each rank then routes all of them alike), this rank's experts on
        # the pairs routed to them, combine as an all-reduce of which each keeps its rows.
        tokens, counts = self.tp.gather_rows(x)  # (sum n, hidden)
        weights, ids = self.gate(tokens)
        out = self.tp.all_reduce(self._local_experts(tokens, weights, ids))
        first = sum(counts[:self.tp.rank])
        out = out[first:first + x.shape[0]]
        return out if self.shared_experts is None else out + self.shared_experts(x)

    def _local_experts(self, x: torch.Tensor, weights: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
        # Dispatch: the (token, slot) pairs routed to this rank's experts, one row each, so
        # the experts kernel runs with K = 1; combine: their weighted rows summed per token.
        e0, e1 = self.experts
        token, slot = ((ids >= e0) & (ids < e1)).nonzero(as_tuple=True)  # (M,), (M,)
        out = torch.zeros(x.shape, dtype=torch.float32, device=x.device)
        if len(token):
            rows = self.moe_experts(x[token], self.w13, self.w2, weights[token, slot][:, None],
                                    (ids[token, slot] - e0)[:, None])  # (M, hidden)
            out.index_add_(0, token, rows.float())
        return out.to(x.dtype)
