"""The CPU platform: runs the whole engine; bfloat16 where the CPU has native support."""
from __future__ import annotations

import torch

from r1serve.kernels.cpu_decode_attention import cpu_attention
from r1serve.kernels.paged_attention import paged_attention_reference
from r1serve.platforms.base import Platform


def _attention(kernel: str):
    return paged_attention_reference if kernel == "reference" else cpu_attention


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
    )
