"""The CPU platform: runs the whole engine; bfloat16 where the CPU has native support.

Kernels come from csrc/ built for one vector ISA (kernels/cpu_isa.py: the CPU's best unless
`cpu_isa` names another it runs); weights are held as platforms/cpu/weight_plan.py says (a
GGUF's own blocks packed for the quantized GEMM, float ones kept or quantized once), each
linear a CpuLinear (platforms/cpu/linear.py). Without a compiler the torch paths serve.
"""
from __future__ import annotations

import functools
import math

import numpy as np
import torch
from torch import nn

from r1serve.kernels.argmax_rows import argmax_rows
from r1serve.kernels.cpu_decode_attention import cpu_attention
from r1serve.kernels.cpu_extension import cpu_kernels
from r1serve.kernels.cpu_isa import best_isa, cpu_flags, cpu_model, runnable_isas
from r1serve.kernels.rms_norm import add_rms_norm
from r1serve.kernels.rotary_kv_write import rotary_kv_write
from r1serve.kernels.silu_and_mul import silu_and_mul
from r1serve.platforms.base import Kernel, KernelTable, Platform
from r1serve.platforms.cpu.decode_layer import decode_layer, takes_layer
from r1serve.platforms.cpu.linear import rounds_activations
from r1serve.platforms.cpu.weight_plan import plan_weights

_KERNEL_DTYPES = (torch.float32, torch.bfloat16)


def _float_or_bf16(module: nn.Module) -> bool:
    # The kernels take float32 and bf16; a float16 model keeps the twins.
    params = list(module.parameters(recurse=False))
    return not params or params[0].dtype in _KERNEL_DTYPES


def _kernel_table(isa: str) -> KernelTable:
    kernels = cpu_kernels(isa)
    # The torch decode path (kernels/cpu_decode_attention.py) serves even without a compiler.
    table = {"paged_attention": Kernel(functools.partial(cpu_attention, kernels=kernels),
                                       f"csrc/{isa}" if kernels else "torch-decode")}
    if kernels is None:
        return table
    name = f"csrc/{isa}"
    table["add_rms_norm"] = Kernel(functools.partial(add_rms_norm, kernels=kernels), name, _float_or_bf16)
    table["argmax_rows"] = Kernel(functools.partial(argmax_rows, kernels=kernels), name)
    table["rotary_kv_write"] = Kernel(functools.partial(rotary_kv_write, kernels=kernels), name)
    table["silu_and_mul"] = Kernel(functools.partial(silu_and_mul, kernels=kernels), name)
    table["decode_layer"] = Kernel(functools.partial(decode_layer, kernels=kernels), name, takes_layer, per_module=True)
    return table


def _lazy_zeros(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # numpy's zeros come from calloc, whose large allocations are fresh zero pages the OS maps
    # on first write: a 1 GiB KV cache costs resident memory only as far as it is used.
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def _auto_kv_cache_dtype(model: nn.Module, dtype: torch.dtype) -> torch.dtype:
    # Attention at 32 sequences streams the cache from memory each step (160 MB at SmolLM2's
    # size in float32): bf16 halves it where the linears' int8 activations already cost more
    # precision than the cache's rounding (docs/performance.md has the tolerance).
    return torch.bfloat16 if dtype == torch.float32 and rounds_activations(model) else dtype


def has_native_bf16(isa: str) -> bool:
    """AVX512-BF16 / AMX make bf16 GEMMs faster than float32; without them (AVX2, NEON
    without BF16) bf16 arithmetic is emulated and float32 activations are faster."""
    flags = cpu_flags()
    capability = torch.backends.cpu.get_cpu_capability()
    return isa == "avx512" and capability.startswith("AVX512") and bool({"avx512_bf16", "amx_bf16"} & flags)


def cpu_platform(isa: str = "auto") -> Platform:
    isa = best_isa() if isa == "auto" else isa
    if isa not in runnable_isas():
        raise ValueError(f"cpu_isa={isa!r} does not run on this CPU ({cpu_model()}); use one of "
                         f"{', '.join(runnable_isas())} or auto")
    kernels = cpu_kernels(isa)
    return Platform(
        name="cpu",
        device=torch.device("cpu"),
        supported_dtypes=(torch.float32, torch.bfloat16, torch.float16),
        dist_backend="gloo",
        preferred_half=torch.bfloat16 if has_native_bf16(isa) else torch.float32,
        kernel_table=functools.partial(_kernel_table, isa),
        prepare_weights=functools.partial(plan_weights, kernels),
        alloc_zeros=_lazy_zeros,
        auto_kv_cache_dtype=_auto_kv_cache_dtype,
        other_kv_cache_dtypes={torch.float32: (torch.bfloat16,), torch.bfloat16: (torch.float32,)},
        host_threads=True,
        describe={"cpu": cpu_model(), "isa": isa, "isa_extensions": kernels.isa_extensions() if kernels else None,
                  "runnable_isas": list(runnable_isas()), "torch_capability": torch.backends.cpu.get_cpu_capability()},
    )
