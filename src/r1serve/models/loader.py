"""From a resolved path (a .gguf file or an HF directory) to a model with weights on the device."""
from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn

import logging

from r1serve.config import EngineConfig
from r1serve.distributed.tensor_parallel import TensorParallel
from r1serve.errors import ModelLoadError
from r1serve.models.checkpoint_slice import whole
from r1serve.platforms.cpu.linear import SmallBatchWeights
from r1serve.models.arch_config import ArchConfig
from r1serve.models.registry import model_class
from r1serve.platforms.base import BoundOp, Platform

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    arch: ArchConfig
    tokenizer: object  # r1serve.tokenizer.Tokenizer
    dtype: torch.dtype
    path: Path
    num_parameters: int  # counted before platform rewrites (packing drops nn.Parameters)
    weight_bytes: int
    kernels: list[BoundOp]  # which kernel serves each op the model's layers declare (platform.bind)


def open_checkpoint(path: Path):
    if path.is_file() and path.suffix == ".gguf":
        from r1serve.models.gguf_checkpoint import GGUFCheckpoint

        return GGUFCheckpoint.open(path)
    if path.is_dir():
        from r1serve.models.hf_checkpoint import HFCheckpoint

        return HFCheckpoint.open(path)
    raise ModelLoadError(f"{path} is neither a .gguf file nor an HF model directory")


def load_model(path: Path, platform: Platform, config: EngineConfig,
               tp: TensorParallel = TensorParallel()) -> LoadedModel:
    """The model (this rank's shard of it, under tensor parallelism) with its weights."""
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
    options = {}
    if config.speculative == "mtp":
        if not getattr(cls, "supports_mtp", False):
            raise ModelLoadError(f"speculative='mtp' drafts with a multi-token-prediction layer, which "
                                 f"{arch.architecture} does not have (DeepSeek-V3/R1 do); use speculative='ngram'")
        options["with_mtp"] = True
    with torch.device("meta"):
        model = cls(arch, tp, **options)
    model = model.to(torch_dtype).to_empty(device=platform.device)
    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers()
    if arch.tie_word_embeddings:  # to_empty unties shared parameters
        model.lm_head.weight = model.model.embed_tokens.weight
    plan = None
    if kernel != "reference":  # the plain-torch twins run untouched: no weight rewrite either
        widened = dtype == "auto" and stored in ("bfloat16", "float16") and torch_dtype == torch.float32
        plan = _small_batch_weights(config, platform, torch_dtype, ckpt, model, widened)
        platform.stage_weights(model, torch_dtype, plan)
    params = list(model.parameters())  # shared (tied) parameters are listed once
    num_parameters = sum(p.numel() for p in params)  # before any is rewritten as it loads
    weight_bytes = sum(p.numel() * p.element_size() for p in params)
    del params
    tokenizer = ckpt.tokenizer()  # before the weights: a GGUF's reader then drops its per-token fields
    weights = ckpt.iter_weights(model.checkpoint_slice if tp.is_parallel else whole)  # only this rank's slices
    if plan is not None and platform.prepare_linear is not None and model.rewrite_linears_as_loaded:
        weights = _rewriting_linears(weights, model, lambda name: platform.prepare_linear(model, name, torch_dtype, plan))
    model.load_weights(weights)
    if tp.is_parallel and platform.fp8_block_gemm and getattr(ckpt, "fp8_block", None):
        log.warning("tensor parallelism serves FP8 checkpoints from their dequantized weights for now "
                    "(the FP8 GEMMs read whole tensors)")
    elif platform.fp8_block_gemm and kernel != "reference" and getattr(ckpt, "fp8_block", None):
        # FP8 matmuls on this device: swap the dequantized copies back for R1's FP8 weights.
        from r1serve.platforms.cuda.fp8_weights import iter_fp8_block_weights, keep_fp8_weights

        keep_fp8_weights(model, iter_fp8_block_weights(ckpt), ckpt.fp8_block)
    if plan is not None:
        platform.prepare_weights(model, torch_dtype, plan)
    bound = platform.bind(model, kernel)
    model.eval()
    return LoadedModel(model, arch, tokenizer, torch_dtype, path, num_parameters, weight_bytes, bound)


def _rewriting_linears(weights: Iterator[tuple[str, torch.Tensor]], model: nn.Module,
                       rewrite: Callable[[str], None]) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors, passed through; each nn.Linear goes to `rewrite` (by its
    module name) once every element of its weight has been loaded, so that its quantized or
    packed copy replaces the staged weight while the others still load. Without this a
    float32 model of a 7B GGUF would hold all its weights in bf16 (14 GB) before quantizing
    them to 4 GB. Linears not complete at the end are left to prepare_weights."""
    name_of = {id(p): name for name, p in model.named_parameters()}  # a tied weight: listed once
    owners: dict[str, list[str]] = {}  # parameter name -> the linears it is the weight of
    for module_name, module in model.named_modules(remove_duplicate=False):
        if type(module) is nn.Linear and id(module.weight) in name_of:
            owners.setdefault(name_of[id(module.weight)], []).append(module_name)
    left = {name: model.get_parameter(name).numel() for name in owners}  # elements not yet loaded
    del name_of
    for name, tensor in weights:
        yield name, tensor
        # The model has copied this tensor by the time it asks for the next one.
        target = model.param_name(name)
        if target in left:
            left[target] -= tensor.numel()
            if left[target] <= 0:
                del left[target]
                for module_name in owners.pop(target):
                    rewrite(module_name)


def _small_batch_weights(config: EngineConfig, platform: Platform, dtype: torch.dtype, ckpt,
                         model: nn.Module, widened: bool) -> SmallBatchWeights:
    quantized = getattr(ckpt, "is_quantized", False)
    int8_rows = config.int8_max_rows if _wants_int8(config, platform, dtype, quantized) else 0
    group_bits = _group_quant_bits(config, platform, dtype, ckpt, model, widened)
    return SmallBatchWeights(int8_rows, config.group_quant_max_rows if group_bits else 0, group_bits)  # None: measured


def _group_quant_bits(config: EngineConfig, platform: Platform, dtype: torch.dtype, ckpt,
                      model: nn.Module, widened: bool) -> dict[str, int]:
    # widened: dtype auto made a 16-bit checkpoint float32 (a CPU without native bf16).
    usable = platform.group_quant_gemm and dtype in (torch.bfloat16, torch.float32)
    if config.group_quant in ("int4", "int8") and not usable:
        raise ModelLoadError(f"group_quant={config.group_quant!r} needs dtype bfloat16 or float32 on a platform "
                             f"with the group-quantized GEMM (the cpu platform with its kernels built); "
                             f"got dtype {dtype} on {platform.name}")
    if not usable or config.group_quant == "off" or config.group_quant_max_rows == 0:
        return {}
    linears = [name for name, module in model.named_modules() if isinstance(module, nn.Linear)]
    if config.group_quant != "auto":
        return dict.fromkeys(linears, 4 if config.group_quant == "int4" else 8)
    stored = _stored_bits(ckpt, model)
    if not stored and widened:
        log.info("dtype auto on a CPU without native bf16: the 16-bit weights serve from int8 groups (Q8_0's form, "
                 "within half a step of 255 levels per 32 weights) rather than float32 copies at twice the bytes; "
                 "--group-quant off keeps float32")
        return dict.fromkeys(linears, 8)
    return stored


def _stored_bits(ckpt, model: nn.Module) -> dict[str, int]:
    # Linear name -> 4 or 8: the group form that holds the widest checkpoint tensor feeding
    # its weight (a fused qkv_proj takes q's, k's and v's; a tied lm_head the embedding's).
    bits = getattr(ckpt, "weight_bits", dict)()
    if not bits or not hasattr(model, "param_name"):
        return {}
    params = dict(model.named_parameters())
    widest: dict[int, int] = {}
    for name, b in bits.items():
        param = params.get(model.param_name(name))
        if param is not None:
            widest[id(param)] = max(widest.get(id(param), 0), b)
    out = {}
    for name, module in model.named_modules():
        b = widest.get(id(module.weight), 16) if isinstance(module, nn.Linear) else 16
        if b <= 8:
            out[name] = 4 if b <= 4 else 8
    return out


def _wants_int8(config: EngineConfig, platform: Platform, dtype: torch.dtype, quantized: bool) -> bool:
    usable = platform.int8_weight_gemm and dtype == torch.bfloat16
    if config.int8_small_batch == "on" and not usable:
        raise ModelLoadError(f"int8_small_batch='on' needs dtype bfloat16 on a platform with an int8 weight GEMM "
                             f"(cpu); got dtype {dtype} on {platform.name}")
    return usable and (config.int8_small_batch == "on" or (config.int8_small_batch == "auto" and quantized))
