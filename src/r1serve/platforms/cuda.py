"""The CUDA platform: selected automatically when a GPU is visible."""
from __future__ import annotations

import torch

from r1serve.kernels.paged_attention import paged_attention_reference
from r1serve.platforms.base import Platform


def cuda_platform() -> Platform:
    bf16 = torch.cuda.is_bf16_supported()
    return Platform(
        name="cuda",
        device=torch.device("cuda", torch.cuda.current_device()),
        supported_dtypes=(torch.float32, torch.bfloat16, torch.float16) if bf16 else (torch.float32, torch.float16),
        # Hand-written CUDA kernels plug in here; until then the twin runs on the GPU.
        attention=lambda kernel: paged_attention_reference,
        dist_backend="nccl",
        preferred_half=torch.bfloat16 if bf16 else torch.float16,
    )
