"""Triton kernels for NVIDIA GPUs: one file per kernel, each written to one template.

    @triton.jit kernel   the work of one program (one tile), with the memory layout it assumes
    wrapper              asserts shapes, strides, dtypes and contiguity before launch (a wrong
                         stride is silent memory corruption on a GPU, not an exception);
                         allocates the output; sets the grid
    twin                 the plain-torch function the wrapper is tested against, named in the
                         module docstring (tests/test_triton_kernels.py runs every kernel
                         under TRITON_INTERPRET=1 on the CPU; benchmarks/gpu_check.py on a GPU)

The package never imports these modules itself: platforms/cuda/__init__.py imports them only when
`triton_available()`, so r1serve imports and every non-CUDA path runs where triton is absent.
"""
from __future__ import annotations

import functools


@functools.cache
def triton_available() -> bool:
    """Whether triton imports here (decided once per process)."""
    try:
        import triton  # noqa: F401
    except Exception:  # not installed, or a build that does not load on this machine
        return False
    return True


def next_power_of_2(n: int) -> int:
    # tl.arange needs power-of-two extents: tiles are padded up and masked.
    return 1 << max(0, n - 1).bit_length()
