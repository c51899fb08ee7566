"""One rank's place in a tensor-parallel group, and the collectives the parallel layers call.

Layers of a sharded model hold 1/size of the heads, MLP columns, vocabulary rows or experts;
they say where their partial results are summed (`all_reduce` after o_proj and down_proj,
after the MoE experts) and the LM head gathers its vocabulary slices to rank 0, which
samples. A group of one rank (the default) makes every collective the identity, so the same
model code serves one device and many.

The group is passed explicitly to the model's constructor; the torch ProcessGroup it holds
is the one torch.distributed made for these ranks (gloo on the CPU, NCCL on CUDA, HCCL on
Ascend: the platform's `dist_backend`).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist

from r1serve.errors import ModelLoadError


@dataclass(frozen=True)
class TensorParallel:
    rank: int = 0
    size: int = 1
    group: object | None = None  # torch.distributed ProcessGroup; None for one rank
    # DeepSeekMoE: routed experts split across the ranks (each whole) rather than every
    # expert's columns; shared experts are then replicated.
    expert_parallel: bool = False
    # Sums of at most this many gathered bytes (size x the tensor's) go as an all-gather and
    # a local sum: on gloo a small all_reduce takes ~2.5x an all-gather (1.3 ms against
    # 0.5 ms between two processes here), the crossover near 1 MiB. 0: always all_reduce.
    gather_sum_bytes: int = 0
    # DP attention (data-parallel replicas, one rank each, experts split across them): the
    # replicas run attention, dense layers, the embedding and the LM head whole on their own
    # sequences; only the MoE layers are one group, over every replica's tokens.
    dp_attention: bool = False

    @property
    def is_parallel(self) -> bool:
        return self.size > 1

    @property
    def is_first(self) -> bool:
        return self.rank == 0

    def dense(self) -> TensorParallel:
        """The group attention, dense MLPs, the embedding and the LM head split over: this
        one, or under DP attention each rank alone."""
        return TensorParallel() if self.dp_attention else self

    # ---- how a dimension is split -------------------------------------------------------

    def split(self, n: int, what: str) -> tuple[int, int]:
        """This rank's [start, stop) of n items split evenly; n must divide by size."""
        if n % self.size:
            raise ModelLoadError(f"{what}={n} does not divide by tensor_parallel_size={self.size}; "
                                 f"use a size that divides {n}")
        part = n // self.size
        return self.rank * part, (self.rank + 1) * part

    def kv_heads(self, num_kv_heads: int) -> tuple[int, int]:
        """This rank's KV heads. With fewer KV heads than ranks each rank keeps the one its
        query heads read (replicated over size / num_kv_heads ranks), as vLLM and SGLang do."""
        if num_kv_heads >= self.size:
            return self.split(num_kv_heads, "num_key_value_heads")
        if self.size % num_kv_heads:
            raise ModelLoadError(f"num_key_value_heads={num_kv_heads} is fewer than tensor_parallel_size="
                                 f"{self.size} and does not divide it; use a size that is a multiple of it")
        head = self.rank * num_kv_heads // self.size
        return head, head + 1

    def padded_split(self, n: int) -> tuple[int, int]:
        """[start, stop) of n rows split in equal parts of ceil(n / size), the last one padded
        (a vocabulary rarely divides by the rank count); stop may pass n."""
        part = -(-n // self.size)
        return self.rank * part, (self.rank + 1) * part

    # ---- collectives --------------------------------------------------------------------

    def all_reduce(self, x: torch.Tensor) -> torch.Tensor:
        """Sum the ranks' partial results, in place (the identity on one rank)."""
        if self.size == 1:
            return x
        if x.numel() * x.element_size() * self.size > self.gather_sum_bytes:
            dist.all_reduce(x, group=self.group)
            return x
        # Summed in rank order on every rank: all of them get the same bits, as from a ring.
        parts = [torch.empty_like(x) for _ in range(self.size)]
        dist.all_gather(parts, x.contiguous(), group=self.group)
        x.copy_(parts[0])
        for part in parts[1:]:
            x += part
        return x

    def gather_rows(self, x: torch.Tensor) -> tuple[torch.Tensor, list[int]]:
        """Every rank's rows of x (n_r, d), concatenated in rank order (sum n_r, d), and the
        counts n_r: the ranks' batches differ in length, so each is padded to the longest."""
        counts = [torch.zeros(1, dtype=torch.int64) for _ in range(self.size)]
        dist.all_gather(counts, torch.tensor([x.shape[0]], dtype=torch.int64), group=self.group)
        n = [int(c) for c in counts]
        padded = torch.zeros((max(n), *x.shape[1:]), dtype=x.dtype, device=x.device)
        padded[:x.shape[0]] = x
        parts = [torch.empty_like(padded) for _ in range(self.size)]
        dist.all_gather(parts, padded, group=self.group)
        return torch.cat([part[:k] for part, k in zip(parts, n)]), n

    def gather_to_first(self, x: torch.Tensor) -> torch.Tensor | None:
        """(N, d) slices of every rank, concatenated along the last dimension on rank 0
        (N, size * d); None on the other ranks. The LM head's vocabulary slices go to the
        rank that samples, not to all."""
        if self.size == 1:
            return x
        x = x.contiguous()
        parts = [torch.empty_like(x) for _ in range(self.size)] if self.rank == 0 else None
        dist.gather(x, parts, dst=dist.get_global_rank(self.group, 0) if self.group else 0, group=self.group)
        return torch.cat(parts, dim=-1) if parts is not None else None
