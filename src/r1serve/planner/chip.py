"""A chip as the planner sees it: sourced figures, and the calibration of its family.

The catalog (catalog.py) reads chips from TOML; cpu.py builds one for this machine's
CPU. Both build on the classes here.
"""
from __future__ import annotations

from dataclasses import dataclass, field

# figure key -> (label, unit, factor to SI); the order is the order `hw list` prints.
FIGURES = {
    "bf16_tflops": ("BF16 dense", "TFLOPS", 1e12),
    "fp8_tflops": ("FP8 dense", "TFLOPS", 1e12),
    "int8_tops": ("INT8 dense", "TOPS", 1e12),
    "fp4_tflops": ("FP4 dense", "TFLOPS", 1e12),
    "hbm_gb": ("memory", "GB", 1e9),
    "hbm_tb_s": ("memory bandwidth", "TB/s", 1e12),
    "scale_up_gb_s": ("scale-up link, per direction", "GB/s", 1e9),
    "scale_up_domain": ("chips per scale-up domain", "chips", 1),
    "scale_out_gb_s": ("scale-out network, per direction", "GB/s", 1e9),
    "tdp_w": ("power", "W", 1),
}


@dataclass(frozen=True)
class Figure:
    value: float | None  # in the unit FIGURES names; None: not published
    source: str = ""
    alternatives: tuple[str, ...] = ()
    note: str = ""


@dataclass(frozen=True)
class Calibration:
    """What share of each peak a serving step reaches on a chip family, and the fixed cost
    of each operation (launch, synchronisation, pipeline fill) that no roofline shows."""

    family: str
    compute_eff: float  # of dense peak FLOP/s
    memory_eff: float  # of memory bandwidth
    comm_eff: float  # of link bandwidth, for collectives
    matmul_us: float  # static cost per matmul or attention kernel
    vector_us: float  # per elementwise / norm / routing op
    collective_us: float  # per all-to-all or all-reduce
    why: str = ""


@dataclass(frozen=True)
class Chip:
    id: str
    name: str
    family: str
    calibration: Calibration
    figures: dict[str, Figure] = field(compare=False)
    devices_per_chip: int = 1
    detected: bool = False  # this machine's CPU, read at run time (peaks are estimates)
    notes: tuple[str, ...] = ()

    def value(self, key: str) -> float | None:
        f = self.figures.get(key)
        return None if f is None or f.value is None else f.value * FIGURES[key][2]

    def peak_flops(self, fmt: str) -> float | None:
        """Dense FLOP/s for matmuls whose inputs are in `fmt` (bf16, fp8, int8, fp4)."""
        return self.value({"bf16": "bf16_tflops", "fp8": "fp8_tflops", "int8": "int8_tops",
                           "fp4": "fp4_tflops"}[fmt])

    @property
    def memory_bytes(self) -> float:
        return self.value("hbm_gb")

    @property
    def bandwidth(self) -> float | None:
        return self.value("hbm_tb_s")

    def ridge_point(self, fmt: str = "bf16") -> float | None:
        """FLOP per byte at which a kernel stops being memory-bound: peak FLOP/s over bandwidth."""
        peak, bw = self.peak_flops(fmt), self.bandwidth
        return None if peak is None or not bw else peak / bw

    def supports(self, fmt: str) -> bool:
        return fmt == "bf16" or self.peak_flops(fmt) is not None
