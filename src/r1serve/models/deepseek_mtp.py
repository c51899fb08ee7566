"""DeepSeek-V3/R1's multi-token-prediction (MTP) layer: a draft of the token after next.

R1 ships it as `model.layers.{num_hidden_layers}` (the layer after the last). At position p
it combines what the main model knows there with the token that follows, and predicts the
token after that:

    e = enorm(embed(t[p+1]))            (N, hidden)    the embedding is the main model's
    h = hnorm(H[p])                     (N, hidden)    H: the main model's last hidden state
    x = eh_proj(cat[e, h])              (N, hidden)
    x = decoder block(x)                               one MLA + MoE layer, its own KV cache
    logits = lm_head(shared_head.norm(x))              the head is the main model's

(DeepSeek-V3 technical report, section 2.2.) The checkpoint also stores the layer's copies
of the embedding and the head (`embed_tokens`, `shared_head.head`); they equal the main
model's, so they are not loaded twice. Chained for more than one draft, the next position
takes the draft as t[p+1] and this layer's own normalised output as H[p]: what the head
reads, in the same normalised form as the main model's H.
"""
from __future__ import annotations

import torch
from torch import nn

from r1serve.layers.norm import RMSNorm

# The MTP layer's own tensors (checkpoint names after `model.layers.{L}.`); the rest are
# its decoder block's, with the same names as any layer's.
OWN = ("enorm.", "hnorm.", "eh_proj.", "shared_head.norm.")
# Its copies of the main model's embedding and head: not loaded.
SHARED_WITH_MAIN = ("embed_tokens.weight", "shared_head.head.weight")


class SharedHead(nn.Module):
    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.norm = RMSNorm(hidden_size, eps)


class DeepseekMTPLayer(nn.Module):
    def __init__(self, block: nn.Module, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.enorm = RMSNorm(hidden_size, eps)
        self.hnorm = RMSNorm(hidden_size, eps)
        self.eh_proj = nn.Linear(2 * hidden_size, hidden_size, bias=False)
        self.block = block  # a DeepseekV3DecoderLayer (dense or MoE by the others' rule)
        self.shared_head = SharedHead(hidden_size, eps)

    def forward(self, embeds, previous_hidden, positions, rope, kv_cache, meta) -> torch.Tensor:
        """embeds: (N, hidden) of t[p+1]; previous_hidden: (N, hidden) H[p]. Returns the
        normalised output (N, hidden) the head reads, which a chained position takes as H."""
        # As vLLM's DeepSeek MTP does: position 0's embedding is masked out.
        embeds = embeds.masked_fill((positions == 0).unsqueeze(-1), 0.0)
        x = self.eh_proj(torch.cat([self.enorm(embeds), self.hnorm(previous_hidden)], dim=-1))
        x, residual = self.block(rope, x, None, kv_cache, meta)
        return self.shared_head.norm(x, residual)[0]

    @staticmethod
    def param_name(suffix: str) -> str:
        """The parameter (under this layer) a checkpoint tensor `model.layers.{L}.{suffix}` fills."""
        return suffix if suffix.startswith(OWN) else f"block.{suffix}"
