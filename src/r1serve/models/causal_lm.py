"""A decoder stack plus its LM head: what every model class shares.

The stack maps (input_ids, positions, kv_caches, metadata) of a flattened paged batch to
hidden states; the head turns only the rows that sample into float32 logits. Under tensor
parallelism each rank's head holds its rows of the vocabulary, and the logits gather on
rank 0, which samples (the other ranks get None).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from r1serve.parallel.tensor_parallel import TensorParallel
from r1serve.models.arch_config import ArchConfig


@dataclass(frozen=True)
class WeightPart:
    """Where a checkpoint tensor goes: module `module`'s weight, as part `index` of `count`
    stacked along its output rows (q, k and v of a fused qkv_proj), `rows` of them on this
    rank. What a platform needs to build a module from the checkpoint's own blocks."""

    module: str
    index: int
    count: int
    rows: int


class CausalLM(nn.Module):
    # Whether the loader may hand each nn.Linear to the platform's rewrite (quantize, pack) as
    # soon as its weight is loaded: load_weights must then neither hold every parameter until
    # it returns nor read a linear's dense weight after loading it.
    rewrite_linears_as_loaded = False

    def __init__(self, arch: ArchConfig, model: nn.Module, tp: TensorParallel) -> None:
        super().__init__()
        self.arch = arch  # the checkpoint's config (models/arch_config.py)
        self.tp = tp
        self.model = model
        v0, v1 = tp.padded_split(arch.vocab_size)
        self.lm_head = nn.Linear(arch.hidden_size, v1 - v0, bias=False)
        if arch.tie_word_embeddings:
            self.lm_head.weight = model.embed_tokens.weight

    def weight_part(self, checkpoint_name: str) -> WeightPart | None:
        """The module weight a checkpoint tensor is (part of), for models whose platform may
        take their weights as stored blocks; None: loaded as floats by load_weights."""
        return None

    def check_complete(self, loaded: set[str]) -> None:
        """Raise ModelLoadError unless the checkpoint names loaded (as floats by load_weights,
        or as blocks by the platform) cover the model."""
        raise NotImplementedError

    def forward(self, input_ids, positions, kv_caches, meta) -> torch.Tensor:
        return self.model(input_ids, positions, kv_caches, meta)  # (N, hidden)

    def compute_logits(self, hidden: torch.Tensor) -> torch.Tensor | None:
        logits = self.lm_head(hidden).float()  # (B, vocab / size)
        if not self.tp.is_parallel:
            return logits
        full = self.tp.gather_to_first(logits)  # (B, padded vocab) on rank 0
        return None if full is None else full[:, :self.arch.vocab_size]
