"""Which part of a checkpoint tensor one rank reads.

A sharded model answers, per checkpoint tensor name, with a TensorSlice (a range along
one dimension: its heads, its MLP columns, its vocabulary rows), SKIP (nothing of it lives
on this rank: another rank's experts, another rank's share of a row-parallel bias) or None
(the whole tensor: norms, routers, replicated projections). Checkpoint readers read only
that part from the file where the format allows it, so a rank's memory is about its share
of the model, not the whole.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Callable, Final

if TYPE_CHECKING:
    import torch

SKIP: Final = "skip"


@dataclass(frozen=True)
class TensorSlice:
    dim: int  # 0: output rows (column-parallel, vocabulary); 1: input columns (row-parallel)
    start: int
    stop: int  # may pass the tensor's size (a padded vocabulary's last part): clipped on read

    def clipped(self, size: int) -> tuple[int, int]:
        return min(self.start, size), min(self.stop, size)

    def of(self, tensor: torch.Tensor) -> torch.Tensor:
        start, stop = self.clipped(tensor.shape[self.dim])
        return tensor.narrow(self.dim, start, stop - start)


Selection = TensorSlice | None | str  # str: SKIP
# checkpoint tensor name -> what this rank reads of it
SliceOf = Callable[[str], Selection]


def whole(name: str) -> Selection:
    return None


def vocab_rows(param: torch.Tensor, rows: torch.Tensor) -> torch.Tensor:
    """The part of a rank's vocabulary rows a checkpoint slice fills: the last rank's part
    of a vocabulary that does not divide by the rank count is padded, with zero rows (they
    are never looked up, and their logits are cut off after the gather)."""
    n = rows.shape[0]
    if n < param.shape[0] and param.shape[1:] == rows.shape[1:]:
        param[n:].zero_()
        return param[:n]
    return param
