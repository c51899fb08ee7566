"""What the engine needs to know about a device family, in one small object."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from r1serve.layers.attention import AttentionImpl


@dataclass(frozen=True)
class Platform:
    name: str  # "cpu" | "cuda" | "npu"
    device: torch.device
    supported_dtypes: tuple[torch.dtype, ...]
    # Picks the attention kernel; "reference" always gives the plain-torch twin.
    attention: Callable[[str], AttentionImpl]
    dist_backend: str  # torch.distributed backend for multi-device serving
    # dtype "auto" resolves to this for checkpoints stored in 16-bit floats.
    preferred_half: torch.dtype
    # Has a fast weight-only int8 GEMM for bf16 activations (kernels/int8_weight_linear.py).
    int8_weight_gemm: bool = False
    # Has the int4/int8 group-quantized weight GEMM for bf16 activations (kernels/group_quant_linear.py).
    group_quant_gemm: bool = False
    # Has an FP8 block-scaled GEMM: a checkpoint's FP8 weights stay FP8 (platforms/fp8_weights.py).
    fp8_block_gemm: bool = False
    # Rewrites a loaded model for this platform's kernels: (model, dtype, kernel, the
    # SmallBatchWeights of layers/cpu_linear.py: which quantized copies to keep).
    prepare_model: Callable[[nn.Module, torch.dtype, str, object], None] = lambda *args: None
    alloc_zeros: Callable[[tuple, torch.dtype, torch.device], torch.Tensor] = \
        lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device)

    def resolve_dtype(self, requested: str, checkpoint_dtype: str | None) -> torch.dtype:
        if requested != "auto":
            dtype = getattr(torch, requested)
        elif checkpoint_dtype in ("bfloat16", "float16", None):
            dtype = self.preferred_half
        else:
            dtype = getattr(torch, checkpoint_dtype, torch.float32)
        if dtype not in self.supported_dtypes:
            supported = ", ".join(str(d).removeprefix("torch.") for d in self.supported_dtypes)
            raise ValueError(f"dtype {dtype} is not supported on {self.name}; use one of {supported}")
        return dtype

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zero-filled tensor for the KV cache (the CPU platform maps its pages lazily)."""
        return self.alloc_zeros(shape, dtype, self.device)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
