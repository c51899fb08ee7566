"""What the engine needs to know about a device family, in one small object, and the one
step that binds a loaded model to the platform's kernels.

Layers declare the ops a platform may swap: a class attribute `kernel_ops` names instance
attributes that hold the plain-torch twin by default (RMSNorm.add_rms_norm,
PagedAttention.paged_attention, ...). A platform supplies one table from op name to
Kernel; `bind` walks the model once and points every declared op at the table's kernel
where the kernel accepts that module (its shapes, its dtype), leaving the twin elsewhere.
It returns what it chose, which `r1serve info` prints. Nothing else in r1serve picks a
kernel for a layer.
"""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn


def _always(module: nn.Module) -> bool:
    return True


@dataclass(frozen=True)
class Kernel:
    impl: Callable  # called exactly as the twin it replaces
    name: str  # what `r1serve info` shows: "csrc/avx2", "triton", ...
    accepts: Callable[[nn.Module], bool] = _always  # whether it takes this module (shapes, dtype)
    # impl(module) gives the callable for that module (a kernel that keeps its weights at hand)
    per_module: bool = False


KernelTable = dict[str, Kernel]


@dataclass(frozen=True)
class BoundOp:
    op: str
    kernel: str  # a Kernel's name, or "reference" where the twin stays
    modules: int  # how many modules of the model declare the op and got this kernel


def bind_kernels(target: object, table: KernelTable) -> list[BoundOp]:
    """Point every op that a model's modules (or one object, such as the sampler) declare at
    the table's kernel, or leave the twin."""
    chosen: Counter[tuple[str, str]] = Counter()
    for module in target.modules() if isinstance(target, nn.Module) else (target,):
        for op in getattr(type(module), "kernel_ops", ()):
            kernel = table.get(op)
            if kernel is not None and kernel.accepts(module):
                setattr(module, op, kernel.impl(module) if kernel.per_module else kernel.impl)
            chosen[op, kernel.name if kernel is not None and kernel.accepts(module) else "reference"] += 1
    return [BoundOp(op, name, n) for (op, name), n in sorted(chosen.items())]


def _nothing(*args) -> None:
    return None


@dataclass(frozen=True)
class WeightRequest:
    """What a platform is asked to plan for: a model built on the meta device, the checkpoint
    it loads from, and the engine's choices."""

    model: nn.Module
    checkpoint: object  # models/gguf_checkpoint.py's GGUFCheckpoint or models/hf_checkpoint.py's HFCheckpoint
    dtype: torch.dtype  # the activations'
    quantization: str  # EngineConfig.quantization: "auto" | "int4" | "int8" | "none"
    kernel: str  # "reference": the plain-torch twins run, on the weights as loaded
    widened: bool  # dtype "auto" made a 16-bit checkpoint float32 (a CPU without native bf16)
    cache_dir: Path  # where a platform may keep what it measured once per machine


@dataclass(frozen=True)
class WeightPlan:
    """What a platform does to a model's weights while they load, decided before the first
    tensor is read (Platform.prepare_weights) and applied by models/loader.py, which names no
    platform. The default is nothing: the weights stay as loaded, in the model's dtype.

    `packed` names modules whose weights the platform takes in the checkpoint's own block
    form (models/causal_lm.py's WeightPart says which tensors those are): their float
    weights are never allocated, and `from_blocks` builds each module once all its parts are
    in, in order (a part is a BlockTensor, or a float tensor where a rank's slice cut blocks).
    `from_dense` rewrites a linear as soon as its float weight is complete (quantize, pack),
    so the float copies of all linears are never alive at once; `finish` runs after the last
    tensor. `summary` is the load log's line about the weights."""

    packed: frozenset[str] = frozenset()
    from_blocks: Callable[[nn.Module, str, list], None] = _nothing
    from_dense: Callable[[nn.Module, str], None] | None = None
    stage: Callable[[nn.Module], None] = _nothing  # after allocation, before the first tensor
    finish: Callable[[nn.Module], None] = _nothing
    summary: str = "weights as stored"


def _no_plan(request: WeightRequest) -> WeightPlan:
    return WeightPlan()


@dataclass(frozen=True)
class Platform:
    name: str  # "cpu" | "cuda" | a plugin's name ("npu", ...)
    device: torch.device
    supported_dtypes: tuple[torch.dtype, ...]
    dist_backend: str  # torch.distributed backend for multi-device serving
    # dtype "auto" resolves to this for checkpoints stored in 16-bit floats.
    preferred_half: torch.dtype
    # op -> kernel for this device; `bind` applies it (built on demand: it may compile or import).
    kernel_table: Callable[[], KernelTable] = dict
    # How the model's weights are held on this device (WeightPlan above).
    prepare_weights: Callable[[WeightRequest], WeightPlan] = _no_plan
    # The KV cache's dtype for kv_cache_dtype "auto": (loaded model, its dtype) -> dtype.
    auto_kv_cache_dtype: Callable[[nn.Module, torch.dtype], torch.dtype] = lambda model, dtype: dtype
    # The cache dtypes its attention kernels take under each activation dtype besides that
    # dtype itself (the CPU's convert rows as they load and store them).
    other_kv_cache_dtypes: dict = field(default_factory=dict)
    alloc_zeros: Callable[[tuple, torch.dtype, torch.device], torch.Tensor] = \
        lambda shape, dtype, device: torch.zeros(shape, dtype=dtype, device=device)
    # What `r1serve info` shows about the device beyond its name (the CPU: model, ISA, flags).
    describe: dict = field(default_factory=dict)
    # The model runs on the host's threads: num_threads (or the cores shared among the
    # ranks) sets torch's thread pool.
    host_threads: bool = False
    # Whether decode steps can be captured as graphs and replayed, under a `kernel` choice:
    # None where they can, else why not (for the log); left out: the device has no graphs.
    graph_capture: Callable[[str], str | None] | None = None

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

    def resolve_kv_cache_dtype(self, requested: str, model: nn.Module, dtype: torch.dtype) -> torch.dtype:
        """The paged cache's dtype for a model whose activations are `dtype`."""
        if model.kv_cache_spec().planes != 2:  # MLA's latent cache: its kernels take the model's dtype
            kv = dtype if requested == "auto" else getattr(torch, requested)
            allowed: tuple = (dtype,)
        else:
            kv = self.auto_kv_cache_dtype(model, dtype) if requested == "auto" else getattr(torch, requested)
            allowed = (dtype, *self.other_kv_cache_dtypes.get(dtype, ()))
        if kv not in allowed:
            names = ", ".join(str(d).removeprefix("torch.") for d in allowed)
            raise ValueError(f"kv_cache_dtype={requested} does not run on {self.name} under "
                             f"{str(dtype).removeprefix('torch.')} activations for this model; use auto or {names}")
        return kv

    def bind(self, target: object, kernel: str = "auto") -> list[BoundOp]:
        """Apply the kernel table to a loaded model (or another object declaring kernel_ops);
        kernel "reference" keeps every twin."""
        return bind_kernels(target, {} if kernel == "reference" else self.kernel_table())

    def zeros(self, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A zero-filled tensor for the KV cache (the CPU platform maps its pages lazily)."""
        return self.alloc_zeros(shape, dtype, self.device)

    def synchronize(self) -> None:
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
