"""The vector layer's ISA paths: the right one is built for this CPU, and each path this
machine can run (and ARM64's, under qemu-aarch64) passes the kernels' own C++ harness."""
from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

from r1serve.kernels.cpu_extension import CSRC, cpu_kernels
from r1serve.kernels.cpu_isa import best_isa, cpu_flags, runnable_isas

HARNESS = Path(__file__).parent / "csrc" / "kernels_harness.cpp"
# .ci/run installs the cross compiler and qemu, and sets this so the ARM test cannot skip there.
REQUIRE_ARM = os.environ.get("R1SERVE_REQUIRE_ARM_HARNESS") == "1"

ZEN3 = frozenset("fpu sse2 avx f16c fma avx2 bmi2 sha_ni".split())
SAPPHIRE_RAPIDS = ZEN3 | {"avx512f", "avx512bw", "avx512dq", "avx512vl", "avx512_bf16", "avx512_vnni", "amx_bf16"}


def test_isas_follow_the_cpu_flags():
    assert runnable_isas(ZEN3, "x86_64") == ("avx2", "scalar")
    assert runnable_isas(SAPPHIRE_RAPIDS, "x86_64") == ("avx512", "avx2", "scalar")
    assert runnable_isas(ZEN3 - {"fma"}, "x86_64") == ("scalar",)  # AVX2 without FMA: no vector build
    assert runnable_isas(frozenset("fp asimd asimddp".split()), "aarch64") == ("neon", "scalar")


def test_the_best_isa_is_the_one_built():
    """A CPU with AVX2 or NEON never runs the scalar layer by accident (e.g. a build that
    lost -march=native): the module reports the vector layer it was compiled with."""
    kernels = cpu_kernels()
    if kernels is None:
        pytest.skip("no C++ compiler: the CPU kernels are not built")
    assert kernels.isa() == best_isa() == runnable_isas()[0]
    if "avx512_vnni" in cpu_flags() and best_isa() == "avx512":
        assert "vnni" in kernels.isa_extensions().split()
    if "avx512_bf16" in cpu_flags() and best_isa() == "avx512":
        assert "bf16" in kernels.isa_extensions().split()


def _build_and_run(compiler: str, flags: list[str], out: Path, runner: list[str]) -> str:
    subprocess.run([compiler, "-std=c++17", "-O2", *flags, f"-I{CSRC}", str(HARNESS), "-o", str(out)],
                   check=True, capture_output=True, text=True, timeout=300)
    run = subprocess.run([*runner, str(out)], capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stdout + run.stderr
    return run.stdout.strip()


CAPS = {"avx512": [], "neon": [], "avx2": ["-mno-avx512f"], "scalar": ["-DR1SERVE_VEC_SCALAR"]}


@pytest.mark.skipif(shutil.which("g++") is None, reason="no g++")
@pytest.mark.parametrize("isa", runnable_isas())
def test_harness_on_this_cpu(isa, tmp_path):
    report = _build_and_run("g++", ["-march=native", *CAPS[isa]], tmp_path / f"harness_{isa}", [])
    assert report.split()[:2] == ["ok", isa], report


def _arm_tools() -> bool:
    found = shutil.which("aarch64-linux-gnu-g++") and shutil.which("qemu-aarch64")
    if not found and REQUIRE_ARM:
        pytest.fail("R1SERVE_REQUIRE_ARM_HARNESS=1 but aarch64-linux-gnu-g++ or qemu-aarch64 is missing")
    return bool(found)


@pytest.mark.parametrize("march,extensions", [("armv8.2-a+dotprod", ["dotprod"]), ("armv8-a", [])])
def test_harness_on_arm64_under_qemu(march, extensions, tmp_path):
    """NEON with SDOT (ARMv8.2+: Graviton 2+, Apple M1+, Ampere) and without (Cortex-A72)."""
    if not _arm_tools():
        pytest.skip("needs Debian's g++-aarch64-linux-gnu and qemu-user")
    report = _build_and_run("aarch64-linux-gnu-g++", [f"-march={march}", "-static"], tmp_path / "harness_arm",
                            ["qemu-aarch64"])
    assert report.split() == ["ok", "neon", *extensions], report


def test_a_lock_left_by_a_killed_build_is_cleared(tmp_path):
    # torch's build lock names no process: one left by a killed build would make every later
    # start wait for ever. Older than a build can take, it is removed; a fresh one is kept.
    import os
    import time
    from types import SimpleNamespace

    from r1serve.kernels.cpu_extension import STALE_LOCK_S, _clear_stale_lock

    fake = SimpleNamespace(_get_build_directory=lambda name, verbose: str(tmp_path / name))
    (tmp_path / "k").mkdir()
    lock = tmp_path / "k" / "lock"
    lock.touch()
    _clear_stale_lock(fake, "k")
    assert lock.exists()  # a build may be running now
    old = time.time() - STALE_LOCK_S - 60
    os.utime(lock, (old, old))
    _clear_stale_lock(fake, "k")
    assert not lock.exists()
    _clear_stale_lock(fake, "k")  # no lock: nothing to do
