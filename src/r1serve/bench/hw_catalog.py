"""The accelerator catalog: chips with sourced figures, and the calibration of each family.

The built-in chips live in accelerators.toml beside this file (package data); a user's
TOML file of the same shape adds chips or replaces one. Every figure keeps its source and
the alternatives other sources give, so `r1serve hw list` can show where a number is from.
"""
from __future__ import annotations

import tomllib
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

from r1serve.errors import R1ServeError

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
REQUIRED = ("bf16_tflops", "hbm_gb", "hbm_tb_s", "scale_up_gb_s")
CALIBRATION_KEYS = ("compute_eff", "memory_eff", "comm_eff", "matmul_us", "vector_us", "collective_us")


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


@dataclass(frozen=True)
class Catalog:
    chips: dict[str, Chip]
    families: dict[str, Calibration]

    def chip(self, chip_id: str) -> Chip:
        key = chip_id.lower()
        for candidate in (key, f"ascend-{key}"):  # "910c" names the Ascend 910C
            if candidate in self.chips:
                return self.chips[candidate]
        close = [c for c in self.chips if key in c]
        hint = f" (did you mean {', '.join(close)}?)" if close else ""
        raise R1ServeError(f"unknown chip {chip_id!r}{hint}; known chips: {', '.join(self.chips)}. "
                           "Add your own with --catalog FILE.toml")


def load_catalog(extra: Path | str | None = None, detect_cpu: bool = True) -> Catalog:
    """The built-in chips, this machine's CPU, then the chips of `extra` (a TOML file)."""
    builtin = tomllib.loads(resources.files("r1serve.bench").joinpath("accelerators.toml").read_text())
    families = _families(builtin.get("families", {}), "accelerators.toml")
    chips = _chips(builtin.get("chips", {}), families, "accelerators.toml")
    if detect_cpu:
        from r1serve.bench.hw_cpu import this_cpu

        cpu = this_cpu(families["cpu"])
        chips[cpu.id] = cpu
    if extra is not None:
        user = _read_toml(Path(extra))
        families = families | _families(user.get("families", {}), str(extra))
        chips |= _chips(user.get("chips", {}), families, str(extra))
    return Catalog(chips, families)


def _read_toml(path: Path) -> dict:
    try:
        return tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise R1ServeError(f"catalog file {path} does not exist") from None
    except tomllib.TOMLDecodeError as e:
        raise R1ServeError(f"catalog file {path} is not valid TOML: {e}") from None


def _families(tables: dict, where: str) -> dict[str, Calibration]:
    return {name: _calibration(name, t, where) for name, t in tables.items()}


def _calibration(name: str, t: dict, where: str) -> Calibration:
    missing = [k for k in CALIBRATION_KEYS if k not in t]
    if missing:
        raise R1ServeError(f"{where}: family {name!r} lacks {', '.join(missing)}")
    for k in CALIBRATION_KEYS[:3]:
        if not 0 < t[k] <= 1:
            raise R1ServeError(f"{where}: family {name!r} has {k}={t[k]}; an efficiency is in (0, 1]")
    return Calibration(name, *(float(t[k]) for k in CALIBRATION_KEYS), why=" ".join(t.get("why", "").split()))


def _chips(tables: dict, families: dict[str, Calibration], where: str) -> dict[str, Chip]:
    return {chip_id.lower(): _chip(chip_id.lower(), t, families, where) for chip_id, t in tables.items()}


def _chip(chip_id: str, t: dict, families: dict[str, Calibration], where: str) -> Chip:
    family = t.get("family")
    if "calibration" in t:
        calibration = _calibration(family or chip_id, (families[family].__dict__ if family in families else {})
                                   | t["calibration"], where)
    elif family in families:
        calibration = families[family]
    else:
        raise R1ServeError(f"{where}: chip {chip_id!r} has family {family!r}; use one of {', '.join(families)} "
                           "or give a [chips.ID.calibration] table")
    figures = {k: _figure(chip_id, k, t[k], where) for k in FIGURES if k in t}
    unknown = set(t) - set(FIGURES) - {"name", "family", "calibration", "devices_per_chip"}
    if unknown:
        raise R1ServeError(f"{where}: chip {chip_id!r} has unknown key(s) {sorted(unknown)}; "
                           f"figures are {', '.join(FIGURES)}")
    missing = [k for k in REQUIRED if figures.get(k, Figure(None)).value is None]
    if missing:
        raise R1ServeError(f"{where}: chip {chip_id!r} needs {', '.join(missing)}")
    figures.setdefault("scale_up_domain", Figure(8, "default: an 8-chip board"))
    return Chip(chip_id, t.get("name", chip_id), family or chip_id, calibration, figures,
                int(t.get("devices_per_chip", 1)))


def _figure(chip_id: str, key: str, raw, where: str) -> Figure:
    if isinstance(raw, (int, float)) and not isinstance(raw, bool):
        value, raw = raw, {}
    elif isinstance(raw, dict):
        value = raw.get("value")
    else:
        raise R1ServeError(f"{where}: {chip_id}.{key} = {raw!r}; give a number or {{value = ..., source = ...}}")
    if value is not None and (not isinstance(value, (int, float)) or value < 0):
        raise R1ServeError(f"{where}: {chip_id}.{key} has value {value!r}; give a number >= 0")
    return Figure(value, raw.get("source", where), tuple(raw.get("alternatives", ())), raw.get("note", ""))
