"""The ranks' process group: how a rank joins it, and how its small sums are taken.

Every rank of a tensor-parallel group (or of DP-attention replicas) joins torch.distributed's
default group with the platform's backend (gloo on the CPU, NCCL on CUDA, HCCL on Ascend),
and a gloo group over the same ranks for host data (step inputs, load errors).
"""
from __future__ import annotations

from datetime import timedelta

import torch.distributed as dist


def init_group(init_method: str, rank: int, world_size: int, backend: str, timeout_s: float):
    """Join the ranks' default group (the platform's backend) and return a gloo group over
    the same ranks for host data (the default group itself when it is gloo)."""
    dist.init_process_group(backend, init_method=init_method, rank=rank, world_size=world_size,
                            timeout=timedelta(seconds=timeout_s))
    return dist.group.WORLD if backend == "gloo" else dist.new_group(backend="gloo")



def gather_sum_bytes(backend: str) -> int:
    """TensorParallel.gather_sum_bytes for a backend: gloo's small all-reduces are slow."""
    return 1 << 20 if backend == "gloo" else 0
