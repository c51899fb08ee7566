"""The numbers that size a deployment: parameters (total and active per token), weight bytes,
KV bytes per token, and the longest context a KV budget holds.

Computed from a built model, or from a config.json alone (the model is built on the meta
device, so R1's 671B parameters cost nothing to count).
"""
from __future__ import annotations

from dataclasses import asdict, dataclass

import torch
from torch import nn

from r1serve.models.arch_config import ArchConfig
from r1serve.models.registry import model_class


@dataclass(frozen=True)
class ModelNumbers:
    architecture: str
    parameters: int
    active_parameters: int  # per token: MoE models use only their routed experts
    dtype: str
    weight_bytes: int
    kv_bytes_per_token: int
    kv_cache_bytes: int
    max_tokens_in_kv_cache: int

    def as_dict(self) -> dict:
        return asdict(self)


def numbers_for(model: nn.Module, arch: ArchConfig, dtype: torch.dtype, kv_cache_bytes: int,
                num_parameters: int | None = None, weight_bytes: int | None = None,
                kv_dtype: torch.dtype | None = None) -> ModelNumbers:
    total = num_parameters if num_parameters is not None else sum(p.numel() for p in model.parameters())
    active = model.active_parameters(total) if hasattr(model, "active_parameters") else total
    per_token = model.kv_cache_spec().bytes_per_token(kv_dtype or dtype)
    return ModelNumbers(arch.architecture, total, active, str(dtype).removeprefix("torch."),
                        weight_bytes if weight_bytes is not None else total * dtype.itemsize,
                        per_token, kv_cache_bytes, kv_cache_bytes // per_token)


def numbers_from_config(hf_config: dict, dtype: torch.dtype, kv_cache_bytes: int) -> ModelNumbers:
    arch = ArchConfig.from_hf(hf_config)
    with torch.device("meta"):
        model = model_class(arch.architecture)(arch)
    return numbers_for(model, arch, dtype, kv_cache_bytes)
