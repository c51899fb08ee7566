"""This machine's CPU as a catalog chip, read from a hand-made /proc."""
from __future__ import annotations

import subprocess
import sys

import pytest

from r1serve.planner.chip import Calibration
from r1serve.planner.cpu import this_cpu

CPUINFO = """processor\t: 0
model name\t: Test CPU 9000
cpu MHz\t\t: 3000.000
flags\t\t: fpu sse2 avx2 fma avx512f avx512_bf16 avx512_vnni
"""
CALIBRATION = Calibration("cpu", 0.5, 0.5, 0.5, 1.0, 1.0, 1.0)


def test_this_cpu_estimates_its_peaks_from_cores_clock_and_flags(tmp_path, monkeypatch):
    (tmp_path / "cpuinfo").write_text(CPUINFO)
    (tmp_path / "meminfo").write_text("MemTotal:       16000000 kB\n")
    monkeypatch.setattr("os.sched_getaffinity", lambda pid: set(range(4)), raising=False)
    chip = this_cpu(CALIBRATION, tmp_path)
    assert chip.detected and chip.name == "this machine: Test CPU 9000" and chip.calibration is CALIBRATION
    # Shown to 3 significant figures: 4 cores x 3 GHz x 128 (avx512_bf16) and x 256 (avx512_vnni).
    assert chip.peak_flops("bf16") == 1.54e12 and chip.peak_flops("int8") == 3.07e12
    assert chip.memory_bytes == pytest.approx(16.4e9) and chip.bandwidth is None
    assert "avx512_bf16" in chip.notes[1]


def test_the_cpu_chip_does_not_import_the_catalog():
    # The catalog adds this CPU to its chips (it imports planner.cpu); an import back would make a cycle.
    code = ("import sys, r1serve.planner.cpu; "
            "assert 'r1serve.planner.catalog' not in sys.modules, 'planner.cpu imports planner.catalog'")
    subprocess.run([sys.executable, "-c", code], check=True)
