"""The CPU platform: runs the whole engine; bfloat16 where the CPU has native support."""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from r1serve.kernels.cpu_decode_attention import cpu_attention
from r1serve.kernels.cpu_extension import cpu_kernels
from r1serve.kernels.group_quant_linear import group_quant_kernel_available
from r1serve.kernels.paged_attention import paged_attention_reference
from r1serve.kernels.rms_norm import add_rms_norm
from r1serve.kernels.rotary_kv_write import rotary_kv_write
from r1serve.kernels.silu_and_mul import silu_and_mul
from r1serve.layers.activation import SiluAndMul
from r1serve.layers.attention import RotaryKVWrite
from r1serve.layers.cpu_linear import SmallBatchWeights, use_cpu_linears
from r1serve.layers.norm import RMSNorm
from r1serve.platforms.base import Platform


def _attention(kernel: str):
    return paged_attention_reference if kernel == "reference" else cpu_attention


def _prepare_model(model: nn.Module, dtype: torch.dtype, kernel: str, small_batch: SmallBatchWeights) -> None:
    # The plain-torch twins run untouched under --kernel reference; float32 keeps F.linear
    # so results stay comparable with the reference implementation at tight tolerances.
    if kernel == "reference":
        return
    if cpu_kernels() is not None:
        for module in model.modules():
            if isinstance(module, RMSNorm):
                module.impl = add_rms_norm
            elif isinstance(module, RotaryKVWrite):
                module.impl = rotary_kv_write
            elif isinstance(module, SiluAndMul):
                module.impl = silu_and_mul
    if dtype == torch.bfloat16:
        use_cpu_linears(model, small_batch)


def _lazy_zeros(shape: tuple, dtype: torch.dtype, device: torch.device) -> torch.Tensor:
    # numpy's zeros come from calloc, whose large allocations are fresh zero pages the OS maps
    # on first write: a 1 GiB KV cache costs resident memory only as far as it is used.
    nbytes = math.prod(shape) * dtype.itemsize
    return torch.from_numpy(np.zeros(nbytes, dtype=np.uint8)).view(dtype).view(shape)


def _has_native_bf16() -> bool:
    # AVX512-BF16 / AMX make bf16 GEMMs faster than fp32; without them bf16 is emulated.
    capability = torch.backends.cpu.get_cpu_capability()
    try:
        with open("/proc/cpuinfo") as f:
            flags = f.read()
    except OSError:
        return False
    return capability.startswith("AVX512") and ("avx512_bf16" in flags or "amx_bf16" in flags)


def cpu_platform() -> Platform:
    return Platform(
        name="cpu",
        device=torch.device("cpu"),
        supported_dtypes=(torch.float32, torch.bfloat16, torch.float16),
        attention=_attention,
        dist_backend="gloo",
        preferred_half=torch.bfloat16 if _has_native_bf16() else torch.float32,
        int8_weight_gemm=True,
        group_quant_gemm=group_quant_kernel_available(),
        prepare_model=_prepare_model,
        alloc_zeros=_lazy_zeros,
    )
