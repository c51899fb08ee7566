"""Running the Triton kernels on the CPU: TRITON_INTERPRET=1, and two repairs to the interpreter.

triton.jit reads TRITON_INTERPRET when a kernel is *decorated*, so `enable()` must run before
any r1serve.kernels.triton module is imported in the process; modules imported earlier
(compiled for a GPU) are reloaded.

The interpreter executes kernels with numpy, and in triton 3.x it gets two things wrong that
the GPU gets right; the repairs make it do what the hardware does, without touching the
kernels under test:

- float downcasts (float32 -> bfloat16 / float16 / float8) truncate, and when rounding
  carries out of the mantissa they corrupt the exponent (-126.3 -> float8 gives -64, not
  -128). The GPU rounds to nearest even; the repair converts through torch, which does too.
- tl.dot multiplies bfloat16 operands as their raw uint16 bit patterns (triton-lang/triton
  issue 11584: bfloat16 is "not supported yet" by the interpreter). The repair widens them
  to float32 first, as the tensor cores do.

Each repair is probed before and after: `problems()` names what still differs from the
hardware, and the tests that depend on it skip with that reason.
"""
from __future__ import annotations

import importlib
import os
import sys

import numpy as np
import torch

_KERNEL_PACKAGE = "r1serve.kernels.triton."


def unavailable() -> str | None:
    """Why triton cannot be used here, or None."""
    try:
        import triton  # noqa: F401
    except Exception as e:  # not installed, or a build that does not load here
        return f"triton is not importable here ({type(e).__name__}: {e}); install it with `pip install triton`"
    return None


def enable() -> str | None:
    """Turn the interpreter on for this process; returns why triton cannot be used, or None."""
    os.environ["TRITON_INTERPRET"] = "1"
    reason = unavailable()
    if reason:
        return reason
    from triton.runtime import interpreter

    _repair_downcasts(interpreter)
    _repair_bf16_dot(interpreter)
    for name in [m for m in sys.modules if m.startswith(_KERNEL_PACKAGE)]:
        importlib.reload(sys.modules[name])  # decorated before the switch: compiled kernels
    return None


def _torch_dtype(tl_dtype):
    import triton.language as tl

    return {tl.float32: torch.float32, tl.float16: torch.float16, tl.bfloat16: torch.bfloat16,
            tl.float8e4nv: torch.float8_e4m3fn, tl.float8e5: torch.float8_e5m2}.get(tl_dtype)


_INT_OF_WIDTH = {1: torch.int8, 2: torch.int16, 4: torch.int32}


def _repair_downcasts(interpreter) -> None:
    original = interpreter._convert_float
    if getattr(original, "_r1serve_repaired", False):
        return

    def convert(data, in_dtype, out_dtype, rounding_mode):
        src, dst = _torch_dtype(in_dtype), _torch_dtype(out_dtype)
        rtz = rounding_mode is not None and "RTZ" in str(rounding_mode)
        if src is None or dst is None or rtz:
            return original(data, in_dtype, out_dtype, rounding_mode)
        bits = torch.from_numpy(np.ascontiguousarray(data).view(f"i{src.itemsize}"))
        out = bits.view(src).to(dst).view(_INT_OF_WIDTH[dst.itemsize])
        return out.numpy().view(f"u{dst.itemsize}").reshape(data.shape)

    convert._r1serve_repaired = True
    interpreter._convert_float = convert


def _repair_bf16_dot(interpreter) -> None:
    import triton.language as tl

    builder = interpreter.InterpreterBuilder
    original = builder.create_dot
    if getattr(original, "_r1serve_repaired", False):
        return

    def create_dot(self, a, b, d, input_precision, max_num_imprecise_acc):
        if a.dtype.scalar == tl.bfloat16 or b.dtype.scalar == tl.bfloat16:
            a = self.cast_impl(a, tl.float32) if a.dtype.scalar == tl.bfloat16 else a
            b = self.cast_impl(b, tl.float32) if b.dtype.scalar == tl.bfloat16 else b
        return original(self, a, b, d, input_precision, max_num_imprecise_acc)

    create_dot._r1serve_repaired = True
    builder.create_dot = create_dot


def problems() -> list[str]:
    """What the interpreter still computes differently from a GPU (empty when repaired)."""
    import triton
    import triton.language as tl

    @triton.jit
    def cast_kernel(x_ptr, y_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        tl.store(y_ptr + r, tl.load(x_ptr + r).to(y_ptr.dtype.element_ty))

    @triton.jit
    def dot_kernel(a_ptr, c_ptr, N: tl.constexpr):
        r = tl.arange(0, N)
        a = tl.load(a_ptr + r[:, None] * N + r[None, :])
        tl.store(c_ptr + r[:, None] * N + r[None, :], tl.dot(a, tl.trans(a)))

    found = []
    x = torch.tensor([-126.3335, -38.412, 1.0625, 0.3, 447.0, -0.001, 3.14159, 250.0] * 2)
    for dtype in (torch.bfloat16, torch.float16, torch.float8_e4m3fn):
        y = torch.empty(16, dtype=dtype)
        cast_kernel[(1,)](x, y, N=16)
        if not torch.equal(y.float(), x.to(dtype).float()):
            found.append(f"float32 -> {dtype} casts do not round to nearest even")
    a = torch.randint(-2, 3, (16, 16)).to(torch.bfloat16)
    c = torch.empty(16, 16)
    dot_kernel[(1,)](a, c, N=16)
    if not torch.equal(c, a.float() @ a.float().T):
        found.append("tl.dot on bfloat16 is wrong")
    return found
