"""This machine's CPU as a catalog entry: cores, ISA features and an estimated peak.

The peak is cores x clock x FLOP per cycle per core for the widest unit the flags show
(two FMA pipes assumed, as on server cores). It is an estimate, and says so; the memory
bandwidth cannot be read from flags at all, so it is left to `r1serve hw measure`.
"""
from __future__ import annotations

import os
import platform
from pathlib import Path

from r1serve.planner.chip import Calibration, Chip, Figure

# FLOP (or int8 op) per cycle per core, by the first feature present.
BF16_PER_CYCLE = (("amx_bf16", 1024), ("avx512_bf16", 128))
FP32_PER_CYCLE = (("avx512f", 64), ("fma", 32), ("avx2", 32), ("asimd", 16))
INT8_PER_CYCLE = (("amx_int8", 2048), ("avx512_vnni", 256), ("avx_vnni", 128))
SHOWN_FLAGS = ("avx2", "fma", "avx512f", "avx512_bf16", "avx512_fp16", "avx512_vnni", "avx_vnni", "amx_tile",
               "amx_bf16", "amx_int8", "asimd", "sve", "sve2")


def cpuinfo(text: str) -> dict:
    """Model name, MHz and ISA flags from /proc/cpuinfo's text (the first processor's)."""
    info = {"flags": set(), "model": platform.processor() or platform.machine(), "mhz": None}
    for line in text.splitlines():
        key, _, value = line.partition(":")
        key, value = key.strip(), value.strip()
        if key in ("flags", "Features") and not info["flags"]:
            info["flags"] = set(value.split())
        elif key == "model name" and value:
            info["model"] = value
        elif key == "cpu MHz" and info["mhz"] is None:
            info["mhz"] = float(value)
    return info


def _per_cycle(flags: set[str], table) -> int | None:
    return next((n for flag, n in table if flag in flags), None)


def this_cpu(calibration: Calibration, proc: Path = Path("/proc")) -> Chip:
    text = (proc / "cpuinfo").read_text() if (proc / "cpuinfo").exists() else ""
    info = cpuinfo(text)
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1
    ghz = (info["mhz"] or 2000.0) / 1000
    clock_note = f"{cores} cores x {ghz:.2f} GHz" + ("" if info["mhz"] else " (clock unknown: 2 GHz assumed)")
    flags = info["flags"]
    fp32 = _per_cycle(flags, FP32_PER_CYCLE) or 8
    bf16 = _per_cycle(flags, BF16_PER_CYCLE) or fp32
    int8 = _per_cycle(flags, INT8_PER_CYCLE)

    def estimate(per_cycle: int, what: str) -> Figure:
        tflops = float(f"{cores * ghz * per_cycle / 1e3:.3g}")
        return Figure(tflops, f"estimate: {clock_note} x {per_cycle} {what}/cycle")

    figures = {"bf16_tflops": estimate(bf16, "FLOP"), "hbm_gb": Figure(_memory_gb(proc), "/proc/meminfo (RAM)"),
               "hbm_tb_s": Figure(None, "not readable from the CPU; run `r1serve hw measure`"),
               "scale_up_gb_s": Figure(None, "not applicable")}
    if int8:
        figures["int8_tops"] = estimate(int8, "int8 op")
    shown = sorted(f for f in SHOWN_FLAGS if f in flags)
    notes = (f"fp32 peak estimate {cores * ghz * fp32 / 1e3:.2f} TFLOPS ({fp32} FLOP/cycle/core)",
             "ISA: " + (", ".join(shown) or "none of the vector extensions r1serve uses"))
    return Chip("cpu", f"this machine: {info['model']}", "cpu", calibration, figures, detected=True, notes=notes)


def _memory_gb(proc: Path) -> float | None:
    meminfo = proc / "meminfo"
    if not meminfo.exists():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemTotal:"):
            return round(int(line.split()[1]) * 1024 / 1e9, 1)
    return None
