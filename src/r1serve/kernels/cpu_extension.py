"""The hand-written CPU kernels (csrc/*.cpp), compiled once per vector ISA and source.

torch's cpp_extension builds them with the machine's compiler (about a minute per ISA;
scripts/setup.sh builds the best one at install, so a first start does not wait). Every
build targets this machine (-march=native) and is capped at its ISA (kernels/cpu_isa.py):
the avx2 build of an AVX512 machine turns AVX512 off, the scalar build selects the vector
layer's portable header.

A build is named by a digest of everything that makes it: the sources and headers, the
flags, the CPU, torch and Python. Two checkouts of different sources therefore never
share, or rebuild, each other's library (nor wait on each other's build lock), and a
changed source is a new build rather than a stale one. Where no compiler is available
every caller keeps its plain-torch path, and this says so once.
"""
from __future__ import annotations

import functools
import hashlib
import logging
import sys
import time
from pathlib import Path

from r1serve.kernels.cpu_isa import best_isa, cpu_flags, cpu_model, runnable_isas

log = logging.getLogger(__name__)
CSRC = Path(__file__).parent / "csrc"
SOURCES = ["argmax_rows.cpp", "bindings.cpp", "quant_linear.cpp", "paged_decode_attention.cpp", "rms_norm.cpp",
           "rotary_kv_write.cpp", "silu_and_mul.cpp"]
# A build takes a minute or two; a build lock older than this was left by a build that was
# killed (torch's lock holds no pid), and every later start would wait on it for ever.
STALE_LOCK_S = 15 * 60
# Flags beyond -march=native that cap a build at an ISA below the machine's best.
_CAP_FLAGS = {"avx512": [], "neon": [], "avx2": ["-mno-avx512f"], "scalar": ["-DR1SERVE_VEC_SCALAR"]}


def build_flags(isa: str) -> list[str]:
    return ["-O3", "-march=native", *([] if isa == best_isa() else _CAP_FLAGS[isa]), "-fopenmp"]


@functools.cache
def cpu_kernels(isa: str | None = None):
    """The compiled module for `isa` (None: the CPU's best), or None when it cannot be built
    (decided once per process and ISA)."""
    isa = isa or best_isa()
    if isa not in runnable_isas():
        raise ValueError(f"cpu_isa={isa!r} does not run on this CPU; it runs {', '.join(runnable_isas())}")
    flags = build_flags(isa)
    name = f"r1serve_cpu_kernels_{isa}_{build_digest(flags)}"
    try:
        from torch.utils import cpp_extension

        if not _built(cpp_extension, name):
            log.warning("building the CPU kernels for %s (once for these sources and this CPU; about a minute)", isa)
        _clear_stale_lock(cpp_extension, name)
        module = cpp_extension.load(name=name, sources=[str(CSRC / s) for s in SOURCES], extra_cflags=flags,
                                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no headers, ...: fall back, never fail serving
        log.warning("hand-written CPU kernels (%s) unavailable (%s); using the plain-torch paths", isa, e)
        return None
    if module.isa() != isa:  # e.g. a compiler too old for the CPU: say so rather than run slow
        log.warning("the %s build of the CPU kernels compiled to the %s vector layer", isa, module.isa())
    return module


def _built(cpp_extension, name: str) -> bool:
    try:
        return (Path(cpp_extension._get_build_directory(name, False)) / f"{name}.so").is_file()
    except Exception:  # a private helper of torch's: if it moves, the message is all that is lost
        return True


def _clear_stale_lock(cpp_extension, name: str, max_age_s: float = STALE_LOCK_S) -> None:
    try:
        lock = Path(cpp_extension._get_build_directory(name, False)) / "lock"
        age = time.time() - lock.stat().st_mtime
    except (OSError, AttributeError):  # no lock (the usual case), or torch's helper moved
        return
    if age > max_age_s:
        log.warning("removing the CPU kernels' build lock left %.0f minutes ago by a build that was interrupted "
                    "(%s)", age / 60, lock)
        lock.unlink(missing_ok=True)


def build_digest(flags: list[str]) -> str:
    """What names a build: csrc/ (sources and headers), the flags, the CPU (-march=native
    compiles for it), torch and Python."""
    import torch

    h = hashlib.sha256()
    for path in sorted(CSRC.glob("*")):
        if path.suffix in (".cpp", ".h"):
            h.update(path.name.encode() + b"\0" + path.read_bytes())
    for part in (*flags, cpu_model(), *sorted(cpu_flags()), torch.__version__, sys.version):
        h.update(part.encode() + b"\0")
    return h.hexdigest()[:12]
