"""From a resolved path (a .gguf file or an HF directory) to a model with weights on the device.

The platform plans how the weights are held before the first tensor is read
(platforms/base.py's WeightPlan); this module applies the plan and names no platform:

    open the checkpoint -> build the model on the meta device -> plan -> allocate what the
    plan keeps as floats -> stream tensors: blocks to the platform's packing, floats to
    load_weights (each linear handed to the plan as soon as its weight is in) -> finish ->
    bind the kernels

so that one copy of the weights exists at the end, and about one tensor's worth beside it
on the way.
"""
from __future__ import annotations

import logging
import resource
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import nn
from tqdm import tqdm

from r1serve.config import EngineConfig
from r1serve.parallel.tensor_parallel import TensorParallel
from r1serve.errors import ModelLoadError
from r1serve.kernels.quantized_weight import BlockTensor, QuantizedWeight
from r1serve.models.arch_config import ArchConfig
from r1serve.models.checkpoint import open_checkpoint
from r1serve.models.checkpoint_slice import whole
from r1serve.models.registry import model_class
from r1serve.platforms.base import BoundOp, Platform, WeightPlan, WeightRequest

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LoadedModel:
    model: nn.Module
    arch: ArchConfig
    tokenizer: object  # r1serve.tokenizer.Tokenizer
    dtype: torch.dtype
    path: Path
    num_parameters: int  # counted on the model as built, before any weight is packed
    weight_bytes: int  # what the weights take once loaded, in whatever form the platform keeps them
    kernels: list[BoundOp]  # which kernel serves each op the model's layers declare (platform.bind)


def load_model(path: Path, platform: Platform, config: EngineConfig,
               tp: TensorParallel = TensorParallel()) -> LoadedModel:
    """The model (this rank's shard of it, under tensor parallelism) with its weights."""
    start = time.perf_counter()
    ckpt = open_checkpoint(path)
    arch = ArchConfig.from_hf(ckpt.hf_config)
    cls = model_class(arch.architecture)
    try:
        stored = None if getattr(ckpt, "is_quantized", False) else arch.torch_dtype
        torch_dtype = platform.resolve_dtype(config.dtype, stored)
    except ValueError as e:
        raise ModelLoadError(str(e)) from None
    # Build without allocating or initialising weights, then materialise on the device:
    # random init of billions of parameters would cost more than loading them.
    with torch.device("meta"):
        model = cls(arch, tp, **_model_options(cls, arch, config))
    num_parameters = sum(p.numel() for p in model.parameters())  # shared (tied) parameters are listed once
    widened = config.dtype == "auto" and stored in ("bfloat16", "float16") and torch_dtype == torch.float32
    plan = platform.prepare_weights(WeightRequest(model, ckpt, torch_dtype, config.quantization, config.kernel,
                                                  widened, config.cache_dir))
    _allocate(model, torch_dtype, platform.device, plan.packed)
    plan.stage(model)
    tokenizer = ckpt.tokenizer()  # before the weights: a GGUF's reader then drops its per-token fields
    placed: set[str] = set()
    weights = ckpt.iter_weights(model.checkpoint_slice if tp.is_parallel else whole,
                                as_blocks=lambda name: _module_of(model, name) in plan.packed)
    weights = _placing_blocks(_with_progress(weights, ckpt, path), model, plan, placed)
    if plan.from_dense is not None and model.rewrite_linears_as_loaded:
        weights = _rewriting_linears(weights, model, lambda name: plan.from_dense(model, name))
    loaded = model.load_weights(weights)
    model.check_complete(loaded | placed)
    plan.finish(model)
    bound = platform.bind(model, config.kernel)
    model.eval()
    weight_bytes = _resident_weight_bytes(model)
    _log_loaded(path, time.perf_counter() - start, ckpt, weight_bytes, plan, bound)
    return LoadedModel(model, arch, tokenizer, torch_dtype, path, num_parameters, weight_bytes, bound)


def _model_options(cls, arch: ArchConfig, config: EngineConfig) -> dict:
    if config.speculative != "mtp":
        return {}
    if not getattr(cls, "supports_mtp", False):
        raise ModelLoadError(f"speculative='mtp' drafts with a multi-token-prediction layer, which "
                             f"{arch.architecture} does not have (DeepSeek-V3/R1 do); use speculative='ngram'")
    return {"with_mtp": True}


def _allocate(model: nn.Module, dtype: torch.dtype, device: torch.device, packed: frozenset[str]) -> None:
    """Materialise the meta model's tensors (floating ones in `dtype`; a tied weight stays
    one tensor), except the weights of modules the platform builds from the checkpoint's
    blocks: those never exist as floats. Each is made from its shape alone: torch's
    to_empty/empty_like on meta tensors imports its symbolic-shape machinery (sympy, 480
    modules, ~35 MB resident for the life of the process)."""
    for name in packed:
        model.get_submodule(name).register_parameter("weight", None)
    made: dict[int, torch.Tensor] = {}  # id of a meta tensor -> its real one (shared ones once)

    def real(t: torch.Tensor, parameter: bool) -> torch.Tensor:
        if id(t) not in made:
            empty = torch.empty(tuple(t.shape), dtype=dtype if t.is_floating_point() else t.dtype, device=device)
            made[id(t)] = nn.Parameter(empty, requires_grad=False) if parameter else empty
        return made[id(t)]

    for module in model.modules():
        for table, parameter in ((module._parameters, True), (module._buffers, False)):
            for name, t in table.items():
                if t is not None and t.is_meta:
                    table[name] = real(t, parameter)
    for module in model.modules():
        if hasattr(module, "init_buffers"):
            module.init_buffers()


def _module_of(model: nn.Module, name: str) -> str | None:
    part = model.weight_part(name)
    return None if part is None else part.module


def _placing_blocks(weights: Iterator[tuple[str, torch.Tensor | BlockTensor]], model: nn.Module, plan: WeightPlan,
                    placed: set[str]) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors, less those of modules the plan packs: their parts (a
    BlockTensor each, or floats where a rank's slice cut blocks) are gathered per module and
    handed to plan.from_blocks once all are in; their names go into `placed`."""
    pending: dict[str, list] = {}
    for name, tensor in weights:
        part = model.weight_part(name) if name.endswith(".weight") else None
        if part is None or part.module not in plan.packed:
            if isinstance(tensor, BlockTensor):
                raise ModelLoadError(f"{name}: read as blocks for a module the plan does not pack")
            yield name, tensor
            continue
        _check_part(name, tensor, part, model)
        parts = pending.setdefault(part.module, [None] * part.count)
        parts[part.index] = tensor
        placed.add(name)
        if all(p is not None for p in parts):
            plan.from_blocks(model, part.module, parts)
            for p in pending.pop(part.module):
                if isinstance(p, BlockTensor):
                    p.release()
    if pending:
        raise ModelLoadError(f"the checkpoint lacks parts of {sorted(pending)[:3]} (fused projections need every part)")


def _check_part(name: str, tensor, part, model: nn.Module) -> None:
    rows, cols = tensor.shape
    module = model.get_submodule(part.module)
    width = module.in_features if isinstance(module, nn.Linear) else module.embedding_dim
    # A rank's slice of a padded vocabulary may hold fewer rows than its module.
    fits = rows == part.rows or (part.count == 1 and rows < part.rows)
    if cols != width or not fits:
        raise ModelLoadError(f"checkpoint tensor {name!r} has shape {(rows, cols)}, the model expects "
                             f"({part.rows}, {width})")


def _rewriting_linears(weights: Iterator[tuple[str, torch.Tensor]], model: nn.Module,
                       rewrite: Callable[[str], None]) -> Iterator[tuple[str, torch.Tensor]]:
    """The checkpoint's tensors, passed through; each nn.Linear goes to `rewrite` (by its
    module name) once every element of its weight has been loaded, so that its quantized or
    packed copy replaces the float weight while the others still load. Without this a
    float32 model of a 7B checkpoint would hold all its weights in bf16 (14 GB) before
    quantizing them to 4 GB. Linears not complete at the end are left to plan.finish."""
    name_of = {id(p): name for name, p in model.named_parameters()}  # a tied weight: listed once
    owners: dict[str, list[str]] = {}  # parameter name -> the linears it is the weight of
    for module_name, module in model.named_modules(remove_duplicate=False):
        if type(module) is nn.Linear and module.weight is not None and id(module.weight) in name_of:
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


def _with_progress(weights: Iterator, ckpt, path: Path) -> Iterator:
    """The tensors, with a progress bar over the checkpoint's bytes (where logging asks for
    INFO and stderr is a terminal: a log file gets the one line at the end instead)."""
    total = getattr(ckpt, "tensor_bytes", lambda: None)()
    shown = log.isEnabledFor(logging.INFO) and sys.stderr.isatty() and total is not None
    bar = tqdm(total=total, unit="B", unit_scale=True, desc=f"loading {path.name}", leave=False,
               disable=not shown, mininterval=0.5)
    with bar:
        for name, tensor in weights:
            bar.update(_stored_bytes(tensor))
            yield name, tensor


def _stored_bytes(tensor) -> int:
    if isinstance(tensor, BlockTensor):
        return tensor.raw.numel()
    return tensor.numel() * tensor.element_size()


def _resident_weight_bytes(model: nn.Module) -> int:
    """The weights' bytes in the forms kept: parameters, packed quantized tables, and oneDNN's
    opaque packed copies (bf16: two bytes a weight); a shared tensor once."""
    seen: set[int] = set()
    total = 0
    for module in model.modules():
        tensors = [p for p in module.parameters(recurse=False)]
        for attr in ("quantized", "table"):
            weight = getattr(module, attr, None)
            if isinstance(weight, QuantizedWeight):
                tensors.append(weight.packed)
        opaque = getattr(module, "packed", None)
        if isinstance(opaque, torch.Tensor) and id(opaque) not in seen:
            seen.add(id(opaque))
            total += 2 * module.out_features * module.in_features
        for t in tensors:
            if t.device.type != "meta" and t.data_ptr() not in seen:
                seen.add(t.data_ptr())
                total += t.numel() * t.element_size()
    return total


def _log_loaded(path: Path, seconds: float, ckpt, weight_bytes: int, plan: WeightPlan, bound: list[BoundOp]) -> None:
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024  # Linux: KiB
    read = getattr(ckpt, "tensor_bytes", lambda: None)()
    kernels = ", ".join(sorted({f"{b.op}={b.kernel}" for b in bound}))
    log.info("loaded %s in %.1f s: %s read, %.2f GiB of weights, peak resident memory %.2f GiB; %s; kernels: %s",
             path.name, seconds, f"{read / 2**30:.2f} GiB" if read else "checkpoint", weight_bytes / 2**30,
             peak / 2**30, plan.summary, kernels or "plain torch")
