"""The CUDA platform: selected automatically when a GPU is visible.

bf16 by default (fp16 on GPUs without bf16). With triton installed the layers run the Triton
kernels of kernels/triton/ (platforms/cuda_kernels.py says which serves what); without it, or
under `--kernel reference`, the plain-torch twins run on the GPU. Hopper and newer keep a
checkpoint's FP8 weights as FP8 (platforms/fp8_weights.py); older GPUs dequantize them while
loading, as the CPU does. Decode steps replay CUDA graphs unless `--enforce-eager`
(engine/cuda_graph_runner.py).
"""
from __future__ import annotations

import torch
from torch import nn

from r1serve.kernels.paged_attention import paged_attention_reference
from r1serve.kernels.triton import triton_available
from r1serve.platforms.base import Platform

FP8_GEMM_CAPABILITY = (9, 0)  # Hopper: FP8 tensor cores that Triton's dot targets


def uses_triton(kernel: str) -> bool:
    return kernel != "reference" and triton_available()


def _attention(kernel: str):
    if not uses_triton(kernel):
        return paged_attention_reference
    from r1serve.platforms.cuda_kernels import paged_attention

    return paged_attention


def _prepare_model(model: nn.Module, dtype: torch.dtype, kernel: str, small_batch: object) -> None:
    # small_batch (the CPU's int8 / group-quantized copies) has no meaning here.
    if uses_triton(kernel):
        from r1serve.platforms.cuda_kernels import use_triton_kernels

        use_triton_kernels(model)


def cuda_platform() -> Platform:
    bf16 = torch.cuda.is_bf16_supported()
    return Platform(
        name="cuda",
        device=torch.device("cuda", torch.cuda.current_device()),
        supported_dtypes=(torch.float32, torch.bfloat16, torch.float16) if bf16 else (torch.float32, torch.float16),
        attention=_attention,
        dist_backend="nccl",
        preferred_half=torch.bfloat16 if bf16 else torch.float16,
        fp8_block_gemm=triton_available() and torch.cuda.get_device_capability() >= FP8_GEMM_CAPABILITY,
        prepare_model=_prepare_model,
    )
