"""A pass of DeepSeek's MTP layer (models/deepseek_mtp.py) as every rank runs it.

Under tensor or expert parallelism the MTP layer is sharded like the others: its attention,
MoE and the shared head's vocabulary slices pair their collectives across the ranks, so rank
0 broadcasts each pass as it does a step (step_broadcast.py) and every rank's Worker runs it.

    MTPPass    the layer over tokens t[p+1] at positions p, with H[p] either rows of this
               rank's last target step (TargetRows: the drafter's pass after a step) or
               given values (the chained passes of a proposal, from rank 0's kept heads)
    MTPLogits  the shared head over given hidden states (logits gathered to rank 0)

H is the same on every rank (each layer's output is all-reduced), so what rank 0 holds it
sends as values; what every rank computed itself (the target step's) it names by rows.
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch

from r1serve.executor.step_inputs import StepInputs


@dataclass(frozen=True)
class TargetRows:
    rows: list[int]  # rows of the last target step's hidden states (N_step, hidden)


@dataclass(frozen=True)
class MTPPass:
    inputs: StepInputs  # t[p+1] at positions p, with their slots in the MTP layer's cache
    previous: TargetRows | torch.Tensor  # H[p]: rows of the target step's, or (N, hidden) values

    def on_host(self) -> MTPPass:
        """As it crosses to the other ranks: values on the CPU (the broadcast is gloo's)."""
        return self if isinstance(self.previous, TargetRows) else replace(self, previous=self.previous.cpu())


@dataclass(frozen=True)
class MTPLogits:
    hidden: torch.Tensor  # (B, hidden): the MTP outputs the head reads

    def on_host(self) -> MTPLogits:
        return MTPLogits(self.hidden.cpu())


def run_mtp(model: torch.nn.Module, message: MTPPass | MTPLogits, last_hidden: torch.Tensor | None,
            kv_cache: torch.Tensor, device: torch.device) -> torch.Tensor:
    """What a message asks of this rank's model: the MTP layer's output (N, hidden), or the
    head's logits (this rank's slice; rank 0 gets them whole)."""
    if isinstance(message, MTPLogits):
        return model.compute_logits(message.hidden.to(device))
    previous = message.previous
    if isinstance(previous, TargetRows):
        previous = last_hidden[torch.tensor(previous.rows, device=last_hidden.device)]
    input_ids, positions, meta, _ = message.inputs.tensors(device)
    return model.mtp_forward(input_ids, positions, previous.to(device), kv_cache, meta)
