"""From a resolved path (a .gguf file or an HF directory) to a model with weights on the device."""
from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

from r1serve.config import EngineConfig
from r1serve.errors import ModelLoadError
from r1serve.models.arch_config import ArchConfig
from r1serve.models.registry import model_class
from r1serve.platforms.base import Platform


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    arch: ArchConfig
    tokenizer: object  # r1serve.tokenizer.Tokenizer
    dtype: torch.dtype
    path: Path
    num_parameters: int  # counted before platform rewrites (packing drops nn.Parameters)
    weight_bytes: int


def open_checkpoint(path: Path):
    if path.is_file() and path.suffix == ".gguf":
        from r1serve.models.gguf_checkpoint import GGUFCheckpoint

        return GGUFCheckpoint.open(path)
    if path.is_dir():
        from r1serve.models.hf_checkpoint import HFCheckpoint

        return HFCheckpoint.open(path)
    raise ModelLoadError(f"{path} is neither a .gguf file nor an HF model directory")


def load_model(path: Path, platform: Platform, config: EngineConfig) -> LoadedModel:
    ckpt = open_checkpoint(path)
    dtype, kernel = config.dtype, config.kernel
    arch = ArchConfig.from_hf(ckpt.hf_config)
    cls = model_class(arch.architecture)
    try:
        stored = None if getattr(ckpt, "is_quantized", False) else arch.torch_dtype
        torch_dtype = platform.resolve_dtype(dtype, stored)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    # Build without allocating or initialising weights, then materialise on the device:
    # random init of billions of parameters would cost more than loading them.
    with torch.device("meta"):
        model = cls(arch, platform.attention(kernel))
    model = model.to(torch_dtype).to_empty(device=platform.device)
    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers()
    if arch.tie_word_embeddings:  # to_empty unties shared parameters
        model.lm_head.weight = model.model.embed_tokens.weight
    model.load_weights(ckpt.iter_weights())
    params = list(model.parameters())  # shared (tied) parameters are listed once
    num_parameters = sum(p.numel() for p in params)
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    int8_rows = config.int8_max_rows if _wants_int8(config, platform, torch_dtype, getattr(ckpt, "is_quantized", False)) else 0
    platform.prepare_model(model, torch_dtype, kernel, int8_rows)
    model.eval()
    return LoadedModel(model, arch, ckpt.tokenizer(), torch_dtype, path, num_parameters, weight_bytes)


def _wants_int8(config: EngineConfig, platform: Platform, dtype: torch.dtype, quantized: bool) -> bool:
    usable = platform.int8_weight_gemm and dtype == torch.bfloat16
    if config.int8_small_batch == "on" and not usable:
        raise ModelLoadError(f"int8_small_batch='on' needs dtype bfloat16 on a platform with an int8 weight GEMM "
                             f"(cpu); got dtype {dtype} on {platform.name}")
    return usable and (config.int8_small_batch == "on" or (config.int8_small_batch == "auto" and quantized))
