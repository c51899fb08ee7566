"""The packed weight formats of the CPU's quantized GEMM, as Python knows them: their sizes,
which GGUF block type packs into which, and the block tensor a checkpoint hands over. The
bytes themselves are drawn in csrc/quant_formats.h. No torch here: the server process reads
a checkpoint's header through this without loading the engine's libraries."""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from enum import IntEnum
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch

GROUP, ROWS, SUPER = 32, 16, 256


class Format(IntEnum):
    G4 = 0
    G8 = 1
    K4 = 2
    K8 = 3

    @property
    def bits(self) -> int:
        return 4 if self in (Format.G4, Format.K4) else 8

    @property
    def two_level(self) -> bool:
        return self in (Format.K4, Format.K8)

    @property
    def halves(self) -> int:  # scale groups per 32 columns
        return 2 if self is Format.K8 else 1

    @property
    def unit_cols(self) -> int:
        return SUPER if self.two_level else GROUP

    @property
    def tile_bytes(self) -> int:  # one group of 32 columns x 16 rows: codes, then scales
        codes = ROWS * GROUP * self.bits // 8
        return codes + (2 * self.halves * ROWS if self.two_level else 4 * ROWS)

    @property
    def unit_bytes(self) -> int:
        return 4 * ROWS + 8 * self.tile_bytes if self.two_level else self.tile_bytes

    def block_bytes(self, K: int) -> int:
        """Bytes of one 16-row block of a K-column weight."""
        return -(-K // self.unit_cols) * self.unit_bytes


# GGUF's block types -> the format their blocks repack into (csrc/gguf_repack.h).
GGML_FORMATS = {2: Format.G4, 3: Format.G4, 6: Format.G8, 7: Format.G8, 8: Format.G8,  # Q4_0 Q4_1 Q5_0 Q5_1 Q8_0
                10: Format.K8, 11: Format.K8, 12: Format.K4, 13: Format.K8, 14: Format.K8}  # Q2_K .. Q6_K


@dataclass(frozen=True)
class BlockTensor:
    """A checkpoint matrix in its stored block form: rows of ggml blocks, as the file holds
    them (a view of the mapped file, or the rows one rank reads), for a platform to pack."""

    raw: torch.Tensor  # (rows, row_bytes) uint8
    ggml_type: int  # GGMLQuantizationType's value, a key of GGML_FORMATS
    shape: tuple[int, int]  # (rows, columns) of the weight it stands for
    # Gives back the memory `raw` was read through (a mapped file's pages), once packed.
    release: Callable[[], None] = lambda: None
