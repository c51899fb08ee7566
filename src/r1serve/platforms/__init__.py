"""Platform selection. An Ascend NPU platform (torch_npu, backend "hccl") slots in beside these."""
from __future__ import annotations

import torch

from r1serve.errors import InvalidRequestError
from r1serve.platforms.base import Platform


def get_platform(device: str = "auto") -> Platform:
    if device == "cuda" or (device == "auto" and torch.cuda.is_available()):
        if not torch.cuda.is_available():
            raise InvalidRequestError("device='cuda' was asked for but no CUDA GPU is visible; use device='cpu'")
        from r1serve.platforms.cuda import cuda_platform

        return cuda_platform()
    from r1serve.platforms.cpu import cpu_platform

    return cpu_platform()


__all__ = ["Platform", "get_platform"]
