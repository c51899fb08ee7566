"""Which vector ISAs this CPU runs, from the kernel's own report of its features.

The CPU kernels (csrc/) are built once per ISA over one vector layer (csrc/vec.h):

    avx512   x86-64 with AVX512 F, BW, DQ and VL (BF16 and VNNI used where present)
    avx2     x86-64 with AVX2, FMA and F16C (AVX-VNNI used where present)
    neon     ARM64 (dotprod used where present)
    scalar   any CPU: plain loops

An AVX512 CPU also runs the avx2 and scalar builds, which is how the tests check every
path this machine can run.
"""
from __future__ import annotations

import functools
import platform
from pathlib import Path

ISAS = ("avx512", "avx2", "neon", "scalar")
_X86_NEEDS = {"avx512": {"avx512f", "avx512bw", "avx512dq", "avx512vl"}, "avx2": {"avx2", "fma", "f16c"}}


@functools.cache
def cpu_flags() -> frozenset[str]:
    """The feature flags the kernel lists for CPU 0 (x86 "flags", ARM "Features")."""
    try:
        text = Path("/proc/cpuinfo").read_text()
    except OSError:
        return frozenset()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            return frozenset(value.split())
    return frozenset()


def cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "CPU part"):
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def runnable_isas(flags: frozenset[str] | None = None, machine: str | None = None) -> tuple[str, ...]:
    """The ISAs this CPU runs, best first; always ends with "scalar"."""
    flags = cpu_flags() if flags is None else flags
    machine = (machine or platform.machine()).lower()
    if machine in ("aarch64", "arm64"):
        return ("neon", "scalar")  # Advanced SIMD is part of every ARMv8-A CPU
    return tuple(isa for isa, needs in _X86_NEEDS.items() if needs <= flags) + ("scalar",)


def best_isa() -> str:
    return runnable_isas()[0]
