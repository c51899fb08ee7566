"""The CUDA platform: selected automatically when a GPU is visible.

bf16 by default (fp16 on GPUs without bf16). With triton installed the layers run the Triton
kernels of kernels/triton/ (platforms/cuda/kernel_table.py says which serves what); without it, or
under `--kernel reference`, the plain-torch twins run on the GPU. Hopper and newer keep a
checkpoint's FP8 weights as FP8 (platforms/cuda/fp8_weights.py, done by the loader); older
GPUs dequantize them while loading, as the CPU does. Decode steps replay CUDA graphs unless `--enforce-eager`
(engine/cuda_graph_runner.py).
"""
from __future__ import annotations

import functools
import logging

import torch

from r1serve.kernels.triton import triton_available
from r1serve.platforms.base import KernelTable, Platform, WeightPlan, WeightRequest

log = logging.getLogger(__name__)

FP8_GEMM_CAPABILITY = (9, 0)  # Hopper: FP8 tensor cores that Triton's dot targets


def uses_triton(kernel: str) -> bool:
    return kernel != "reference" and triton_available()


def _kernel_table() -> KernelTable:
    if not triton_available():
        return {}
    from r1serve.platforms.cuda.kernel_table import triton_table

    return triton_table()


def _plan_weights(fp8_gemm: bool, request: WeightRequest) -> WeightPlan:
    # FP8 checkpoints load dequantized (every platform runs that); with FP8 GEMMs their FP8
    # weights then replace the dequantized copies (platforms/cuda/fp8_weights.py).
    block = getattr(request.checkpoint, "fp8_block", None)
    if not (fp8_gemm and block and request.kernel != "reference"):
        return WeightPlan()
    if request.model.tp.is_parallel:
        log.warning("tensor parallelism serves FP8 checkpoints from their dequantized weights for now "
                    "(the FP8 GEMMs read whole tensors)")
        return WeightPlan()

    def keep_fp8(model) -> None:
        from r1serve.platforms.cuda.fp8_weights import iter_fp8_block_weights, keep_fp8_weights

        keep_fp8_weights(model, iter_fp8_block_weights(request.checkpoint), block)

    return WeightPlan(finish=keep_fp8, summary="FP8 block weights kept as FP8")


def cuda_platform() -> Platform:
    bf16 = torch.cuda.is_bf16_supported()
    fp8_gemm = triton_available() and torch.cuda.get_device_capability() >= FP8_GEMM_CAPABILITY
    return Platform(
        name="cuda",
        device=torch.device("cuda", torch.cuda.current_device()),
        supported_dtypes=(torch.float32, torch.bfloat16, torch.float16) if bf16 else (torch.float32, torch.float16),
        dist_backend="nccl",
        preferred_half=torch.bfloat16 if bf16 else torch.float16,
        kernel_table=_kernel_table,
        prepare_weights=functools.partial(_plan_weights, fp8_gemm),
        describe={"gpu": torch.cuda.get_device_name(), "triton": triton_available()},
        graph_capture=_graph_capture,
    )


def _graph_capture(kernel: str) -> str | None:
    # The twins sync with the host (.item(), data-dependent shapes): not capturable.
    return None if uses_triton(kernel) else f"CUDA graphs need the Triton kernels (kernel={kernel})"
