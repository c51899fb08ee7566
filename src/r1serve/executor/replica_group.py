"""DP attention: data-parallel replicas (one rank each) whose MoE layers are one
expert-parallel group, so they step in lockstep.

Each replica is an engine process of its own with its own scheduler and KV cache; its
attention, dense layers and LM head run its own sequences whole. The routed experts are
split across the replicas, and every MoE layer all-gathers every replica's tokens, so every
replica must run every step: one whose own batch is empty runs an idle step (the MoE
layers' collectives with no tokens of its own). Before each step the replicas agree on
whether any has work, and whether any was told to stop (engine_core.LockstepLoop).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from r1serve.parallel.process_group import gather_sum_bytes, init_group
from r1serve.parallel.tensor_parallel import TensorParallel


@dataclass(frozen=True)
class ReplicaSpec:
    rank: int
    size: int
    init_method: str  # tcp://host:port of replica 0's store


class ReplicaGroup:
    def __init__(self, spec: ReplicaSpec, backend: str, timeout_s: float) -> None:
        self.host = init_group(spec.init_method, spec.rank, spec.size, backend, timeout_s)
        self.tp = TensorParallel(spec.rank, spec.size, dist.group.WORLD, expert_parallel=True,
                                 gather_sum_bytes=gather_sum_bytes(backend), dp_attention=True)

    def agree(self, has_work: bool, stop: bool) -> tuple[bool, bool]:
        """(whether any replica has work, whether any was told to stop), on every replica."""
        flags = torch.tensor([int(has_work), int(stop)])
        dist.all_reduce(flags, op=dist.ReduceOp.MAX, group=self.host)
        return bool(flags[0]), bool(flags[1])

    def shutdown(self) -> None:
        if dist.is_initialized():
            dist.destroy_process_group()
