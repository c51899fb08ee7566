"""The token embedding: (N,) token ids -> (N, hidden) rows of its weight.

Under tensor parallelism each rank holds ceil(vocab / size) rows; a rank looks up the ids
that fall in its rows, zeroes the others, and the all-reduce sums the ranks' rows."""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from r1serve.parallel.tensor_parallel import TensorParallel
from r1serve.kernels.quantized_weight import QuantizedWeight


class VocabEmbedding(nn.Embedding):
    """nn.Embedding without its random init: the weight always comes from a checkpoint.

    The init is not free even on the meta device a model is built on: meta tensors have no
    native normal_, and its first use imports torch's Python decompositions (~150 MB of
    resident memory and 1.5-3 s, kept for the life of the process).

    A platform may keep the table quantized (`look_up_in`: a GGUF's own blocks, or the int8
    groups of an LM head tied to it): rows then come from there, through the platform's
    `rows` function (ids -> float32 rows), and no float table exists."""

    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel = TensorParallel()) -> None:
        self.first_row, stop = tp.padded_split(vocab_size)
        rows = stop - self.first_row
        super().__init__(rows, hidden_size, _weight=torch.empty(rows, hidden_size))
        self.tp = tp
        self.table: QuantizedWeight | None = None
        self.rows: Callable[[QuantizedWeight, torch.Tensor], torch.Tensor] | None = None
        self.out_dtype: torch.dtype | None = None  # the activations' dtype, once the table is quantized

    def look_up_in(self, table: QuantizedWeight, rows: Callable[[QuantizedWeight, torch.Tensor], torch.Tensor],
                   dtype: torch.dtype) -> None:
        assert table.in_features == self.embedding_dim and table.out_features <= self.num_embeddings
        self.table, self.rows, self.out_dtype = table, rows, dtype
        self.register_buffer("qpacked", table.packed, persistent=False)  # counted like any weight
        self.weight = None

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not self.tp.is_parallel:
            return self._rows(input_ids)
        local = input_ids - self.first_row
        elsewhere = (local < 0) | (local >= self.num_embeddings)  # another rank's rows
        rows = self._rows(local.masked_fill(elsewhere, 0)).masked_fill(elsewhere[:, None], 0)
        return self.tp.all_reduce(rows)

    def _rows(self, input_ids: torch.Tensor) -> torch.Tensor:
        if self.table is None:
            return super().forward(input_ids)
        return self.rows(self.table, input_ids.reshape(-1)).to(self.out_dtype).view(*input_ids.shape, -1)
