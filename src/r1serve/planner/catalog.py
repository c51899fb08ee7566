"""The accelerator catalog: chips with sourced figures, and the calibration of each family.

The built-in chips live in accelerators.toml beside this file (package data); a user's
TOML file of the same shape adds chips or replaces one. Every figure keeps its source and
the alternatives other sources give, so `r1serve hw list` can show where a number is from.
"""
from __future__ import annotations

import sys
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

if sys.version_info >= (3, 11):
    import tomllib
else:  # the same parser, before it joined the standard library
    import tomli as tomllib

from r1serve.planner.chip import FIGURES, Calibration, Chip, Figure
from r1serve.planner.cpu import this_cpu
from r1serve.errors import R1ServeError

REQUIRED = ("bf16_tflops", "hbm_gb", "hbm_tb_s", "scale_up_gb_s")
CALIBRATION_KEYS = ("compute_eff", "memory_eff", "comm_eff", "matmul_us", "vector_us", "collective_us")


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
    builtin = tomllib.loads(resources.files("r1serve.planner").joinpath("accelerators.toml").read_text())
    families = _families(builtin.get("families", {}), "accelerators.toml")
    chips = _chips(builtin.get("chips", {}), families, "accelerators.toml")
    if detect_cpu:
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
