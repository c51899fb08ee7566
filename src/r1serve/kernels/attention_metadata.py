"""Batch metadata every attention layer reads: where each sequence's tokens sit in the
flattened batch and in the paged KV cache. Written once per step by the model runner."""
from __future__ import annotations

from dataclasses import dataclass
from functools import cached_property

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    # The step's tokens are flattened: sequence b owns rows query_start[b]:query_start[b+1].
    query_lens: list[int]  # (B,) new tokens per sequence this step
    seq_lens: list[int]  # (B,) context length after this step (cached + new)
    slot_mapping: torch.Tensor  # (N,) int64 cache slot (block_id * block_size + offset) per new token
    block_tables: torch.Tensor  # (B, max_blocks) int64, padded with 0
    block_size: int
    seq_lens_tensor: torch.Tensor  # (B,) int64, seq_lens on the device

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @cached_property
    def is_decode_only(self) -> bool:  # asked by every attention layer: computed once a step
        return all(q == 1 for q in self.query_lens)

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], slot_mapping: torch.Tensor,
              block_tables: torch.Tensor, block_size: int) -> "AttentionMetadata":
        s_lens = torch.tensor(seq_lens, device=slot_mapping.device)
        return cls(query_lens, seq_lens, slot_mapping, block_tables, block_size, s_lens)

    # Derived on first use, then shared by all layers of the step. The hand-written decode
    # kernel reads block tables directly and never needs these.

    @cached_property
    def token_seq(self) -> torch.Tensor:
        # (N,) which sequence each token belongs to
        q_lens = torch.tensor(self.query_lens, device=self.slot_mapping.device)
        return torch.repeat_interleave(torch.arange(self.num_seqs, device=q_lens.device), q_lens)

    @cached_property
    def token_pos_in_query(self) -> torch.Tensor:
        # (N,) index of each token within its sequence's query
        starts = torch.tensor([0] + self.query_lens[:-1], device=self.slot_mapping.device).cumsum(0)
        return torch.arange(len(self.slot_mapping), device=starts.device) - starts[self.token_seq]

    @cached_property
    def key_slots(self) -> torch.Tensor:
        # (B, max_seq_len) cache slot of every context position
        pos = torch.arange(max(self.seq_lens), device=self.block_tables.device)
        return self.block_tables[:, pos // self.block_size] * self.block_size + pos % self.block_size

    @cached_property
    def attn_mask(self) -> torch.Tensor:
        # (B, 1, max_query_len, max_seq_len) bool, True = may attend.
        # Query i of sequence b sits at absolute position (seq_len - query_len + i) and
        # sees every key at or before it: causal within the chunk, full over the prefix.
        device = self.seq_lens_tensor.device
        q_lens = torch.tensor(self.query_lens, device=device)
        pos = torch.arange(max(self.seq_lens), device=device)
        q_abs = (self.seq_lens_tensor - q_lens)[:, None] + torch.arange(max(self.query_lens), device=device)[None, :]
        mask = pos[None, None, :] <= q_abs[:, :, None]  # (B, Tq, Lk)
        mask &= pos[None, None, :] < self.seq_lens_tensor[:, None, None]
        return mask[:, None]
