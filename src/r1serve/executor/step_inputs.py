"""A step's model inputs as plain lists, and the tensors the model takes built from them.

The model runner writes one per step from the scheduler's chunks. Under tensor parallelism
rank 0 broadcasts it and every rank builds its own tensors on its own device: what crosses
between ranks is a few lists and one CPU tensor, never a device tensor.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from r1serve.kernels.attention_metadata import AttentionMetadata


@dataclass(frozen=True)
class StepInputs:
    input_ids: list[int]  # (N,) the step's tokens, sequence after sequence
    positions: list[int]  # (N,)
    slot_mapping: list[int]  # (N,) cache slot of each token
    query_lens: list[int]  # (B,)
    seq_lens: list[int]  # (B,)
    block_tables: torch.Tensor  # (B, max_blocks) int64 on the CPU
    block_size: int
    logits_rows: list[int] | None  # rows whose logits are wanted; None: no row samples

    def tensors(self, device: torch.device) -> tuple[torch.Tensor, torch.Tensor, AttentionMetadata, torch.Tensor | None]:
        """(input_ids, positions, metadata, logits rows) on the device."""
        meta = AttentionMetadata.build(self.query_lens, self.seq_lens, torch.tensor(self.slot_mapping, device=device),
                                       self.block_tables.to(device), self.block_size)
        rows = None if self.logits_rows is None else torch.tensor(self.logits_rows, device=device, dtype=torch.long)
        return torch.tensor(self.input_ids, device=device), torch.tensor(self.positions, device=device), meta, rows
