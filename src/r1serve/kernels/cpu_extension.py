"""The hand-written CPU kernels (csrc/*.cpp), compiled on first use, once per vector ISA.

torch's cpp_extension builds them with the machine's compiler into the torch extensions
cache (about a minute per ISA, once per source change; scripts/setup.sh builds the best
one ahead of time). Every build targets this machine (-march=native) and is capped at its
ISA (kernels/cpu_isa.py): the avx2 build of an AVX512 machine turns AVX512 off, the scalar
build selects the vector layer's portable header. Where no compiler is available every
caller keeps its plain-torch path, and this says so once.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

from r1serve.kernels.cpu_isa import best_isa, runnable_isas

log = logging.getLogger(__name__)
CSRC = Path(__file__).parent / "csrc"
SOURCES = ["argmax_rows.cpp", "bindings.cpp", "group_quant_linear.cpp", "paged_decode_attention.cpp", "rms_norm.cpp",
           "rotary_kv_write.cpp", "silu_and_mul.cpp"]
# Flags beyond -march=native that cap a build at an ISA below the machine's best.
_CAP_FLAGS = {"avx512": [], "neon": [], "avx2": ["-mno-avx512f"], "scalar": ["-DR1SERVE_VEC_SCALAR"]}


@functools.cache
def cpu_kernels(isa: str | None = None):
    """The compiled module for `isa` (None: the CPU's best), or None when it cannot be built
    (decided once per process and ISA)."""
    isa = isa or best_isa()
    if isa not in runnable_isas():
        raise ValueError(f"cpu_isa={isa!r} does not run on this CPU; it runs {', '.join(runnable_isas())}")
    flags = [] if isa == best_isa() else _CAP_FLAGS[isa]
    try:
        from torch.utils.cpp_extension import load

        module = load(name=f"r1serve_cpu_kernels_{isa}", sources=[str(CSRC / s) for s in SOURCES],
                      extra_cflags=["-O3", "-march=native", *flags, "-fopenmp", f"-DR1SERVE_HEADERS={headers_digest()}"],
                      extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no headers, ...: fall back, never fail serving
        log.warning("hand-written CPU kernels (%s) unavailable (%s); using the plain-torch paths", isa, e)
        return None
    if module.isa() != isa:  # e.g. a compiler too old for the CPU: say so rather than run slow
        log.warning("the %s build of the CPU kernels compiled to the %s vector layer", isa, module.isa())
    return module


def headers_digest() -> str:
    """A digest of csrc/*.h: torch rebuilds when sources or flags change, and headers reach
    it through this flag."""
    h = hashlib.sha256()
    for path in sorted(CSRC.glob("*.h")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
