"""Batch metadata every attention layer reads: where each sequence's tokens sit in the
flattened batch and in the paged KV cache. Written once per step by the model runner."""
from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class AttentionMetadata:
    # The step's tokens are flattened: sequence b owns rows query_start[b]:query_start[b+1].
    query_lens: list[int]  # (B,) new tokens per sequence this step
    seq_lens: list[int]  # (B,) context length after this step (cached + new)
    slot_mapping: torch.Tensor  # (N,) int64 cache slot (block_id * block_size + offset) per new token
    block_tables: torch.Tensor  # (B, max_blocks) int64, padded with 0
    block_size: int
    # Derived once per step, shared by all layers (see build()).
    token_seq: torch.Tensor  # (N,) which sequence each token belongs to
    token_pos_in_query: torch.Tensor  # (N,) index of each token within its sequence's query
    key_slots: torch.Tensor  # (B, max_seq_len) cache slot of every context position
    attn_mask: torch.Tensor  # (B, 1, max_query_len, max_seq_len) bool, True = may attend
    seq_lens_tensor: torch.Tensor  # (B,) int64, seq_lens on the device

    @property
    def num_seqs(self) -> int:
        return len(self.query_lens)

    @property
    def is_decode_only(self) -> bool:
        return all(q == 1 for q in self.query_lens)

    @classmethod
    def build(cls, query_lens: list[int], seq_lens: list[int], slot_mapping: torch.Tensor,
              block_tables: torch.Tensor, block_size: int) -> "AttentionMetadata":
        device = slot_mapping.device
        B, Tq, Lk = len(query_lens), max(query_lens), max(seq_lens)
        q_lens = torch.tensor(query_lens, device=device)
        s_lens = torch.tensor(seq_lens, device=device)
        token_seq = torch.repeat_interleave(torch.arange(B, device=device), q_lens)
        starts = torch.cumsum(q_lens, 0) - q_lens
        token_pos = torch.arange(int(q_lens.sum()), device=device) - starts[token_seq]
        pos = torch.arange(Lk, device=device)
        key_slots = block_tables[:, pos // block_size] * block_size + pos % block_size  # (B, Lk)
        # Query i of sequence b sits at absolute position (seq_len - query_len + i) and
        # sees every key at or before it: causal within the chunk, full over the prefix.
        q_abs = (s_lens - q_lens)[:, None] + torch.arange(Tq, device=device)[None, :]  # (B, Tq)
        mask = pos[None, None, :] <= q_abs[:, :, None]  # (B, Tq, Lk)
        mask &= pos[None, None, :] < s_lens[:, None, None]
        return cls(query_lens, seq_lens, slot_mapping, block_tables, block_size,
                   token_seq, token_pos, key_slots, mask[:, None], s_lens)
