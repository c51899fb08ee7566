"""The hand-written CPU kernels (csrc/*.cpp), compiled on first use.

torch's cpp_extension builds them with the machine's compiler into the torch extensions
cache (about a minute, once per source change; scripts/setup.sh does it ahead of time). Where no compiler is available every
caller keeps its plain-torch path, and this says so once.
"""
from __future__ import annotations

import functools
import hashlib
import logging
from pathlib import Path

log = logging.getLogger(__name__)
CSRC = Path(__file__).parent / "csrc"
SOURCES = ["argmax_rows.cpp", "bindings.cpp", "group_quant_linear.cpp", "paged_decode_attention.cpp", "rms_norm.cpp", "rotary_kv_write.cpp", "silu_and_mul.cpp"]


@functools.cache
def cpu_kernels():
    """The compiled module, or None when it cannot be built (decided once per process)."""
    try:
        from torch.utils.cpp_extension import load

        return load(name="r1serve_cpu_kernels", sources=[str(CSRC / s) for s in SOURCES],
                    extra_cflags=["-O3", "-march=native", "-fopenmp", f"-DR1SERVE_HEADERS={headers_digest()}"],
                    extra_ldflags=["-fopenmp"], verbose=False)
    except Exception as e:  # no compiler, no headers, ...: fall back, never fail serving
        log.warning("hand-written CPU kernels unavailable (%s); using the plain-torch paths", e)
        return None


def headers_digest() -> str:
    """A digest of csrc/*.h: torch rebuilds when sources or flags change, and headers reach
    it through this flag."""
    h = hashlib.sha256()
    for path in sorted(CSRC.glob("*.h")):
        h.update(path.read_bytes())
    return h.hexdigest()[:16]
