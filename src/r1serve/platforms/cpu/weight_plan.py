"""How the CPU platform holds a model's weights: the WeightPlan it hands the loader.

    a GGUF's quantized matrices   packed from the file's own blocks as they are read, in C++,
                                  exactly (kernels/quantized_weight.py); served by the
                                  quantized GEMM at every batch size. An embedding looks its
                                  rows up in its blocks; a tied LM head shares them.
    float matrices                quantization "int4" / "int8": quantized once loaded, into
                                  groups of 32. "auto": int8 where dtype auto widened 16-bit
                                  weights to float32 (a CPU without native bf16: half the
                                  bytes of a float32 copy, within half a step of 255 levels
                                  per 32 weights), else kept in the model's dtype, bf16 ones
                                  packed once for oneDNN.
    quantization "none", or       every weight dense in the model's dtype, dequantized from
    kernel "reference"            the file where it is quantized (the exact path).

Either way one copy of each weight exists once loading is done.
"""
from __future__ import annotations

import functools
import logging
from collections import Counter

import torch
from torch import nn

from r1serve.errors import ModelLoadError
from r1serve.kernels.onednn_linear import packing_available
from r1serve.kernels.quantized_weight import GGML_FORMATS, dequantize_rows, pack_parts, quantize_weight
from r1serve.layers.embedding import VocabEmbedding
from r1serve.platforms.base import WeightPlan, WeightRequest
from r1serve.platforms.cpu.linear import CpuLinear, tune_padding
from r1serve.platforms.cpu.tuning_cache import TuningCache

log = logging.getLogger(__name__)
KERNEL_DTYPES = (torch.float32, torch.bfloat16)
_BITS = {"int4": 4, "int8": 8}


def plan_weights(kernels, request: WeightRequest) -> WeightPlan:
    """The plan for one model (kernels: the compiled CPU kernels of the platform's ISA, or None)."""
    mode, dtype = request.quantization, request.dtype
    if mode in _BITS and (kernels is None or dtype not in KERNEL_DTYPES or request.kernel == "reference"):
        raise ModelLoadError(f"quantization={mode!r} needs dtype bfloat16 or float32 and the CPU kernels (a C++ "
                             f"compiler, kernel auto); got dtype {str(dtype).removeprefix('torch.')}, kernel "
                             f"{request.kernel}, kernels {'built' if kernels else 'unavailable'}")
    if kernels is None or dtype not in KERNEL_DTYPES or request.kernel == "reference":
        return WeightPlan(summary=f"dense {str(dtype).removeprefix('torch.')} weights, plain torch")
    packed = packed_modules(request.model, request.checkpoint) if mode != "none" else frozenset()
    bits = _BITS.get(mode, 8 if mode == "auto" and request.widened else None)
    builder = _Builder(kernels, dtype, bits, dtype == torch.bfloat16 and packing_available(),
                       TuningCache(request.cache_dir), _tied_embedding(request.model))
    return WeightPlan(packed=packed, from_blocks=builder.from_blocks,
                      from_dense=builder.from_dense if builder.rewrites_dense else None,
                      stage=builder.stage, finish=builder.finish, summary=_summary(request, packed, bits, builder))


def packed_modules(model: nn.Module, checkpoint) -> frozenset[str]:
    """The modules every part of whose weight the checkpoint stores in a block format with a
    packed form (a tied LM head goes with its embedding)."""
    types = getattr(checkpoint, "block_types", dict)()
    parts: dict[str, set[int]] = {}
    counts: dict[str, int] = {}
    for name in types:
        part = model.weight_part(name)
        if part is not None:
            parts.setdefault(part.module, set()).add(part.index)
            counts[part.module] = part.count
    packed = {module for module, got in parts.items() if len(got) == counts[module]}
    embedding = _tied_embedding(model)
    if embedding is not None and embedding in packed:
        packed.add("lm_head")
    return frozenset(packed)


def _tied_embedding(model: nn.Module) -> str | None:
    head = getattr(getattr(model, "lm_head", None), "weight", None)
    if head is None:
        return None
    return next((name for name, m in model.named_modules() if isinstance(m, VocabEmbedding) and m.weight is head), None)


def _summary(request: WeightRequest, packed: frozenset[str], bits: int | None, builder: _Builder) -> str:
    types = getattr(request.checkpoint, "block_types", dict)()
    stored = Counter(GGML_FORMATS[t].name for name, t in types.items()
                     if (part := request.model.weight_part(name)) is not None and part.module in packed)
    parts = []
    if packed:
        parts.append(f"{len(packed)} modules packed from the file's blocks ("
                     + ", ".join(f"{n} {f}" for f, n in sorted(stored.items())) + ")")
    dense = (f"int{bits} groups" if bits else "packed bf16 (oneDNN)" if builder.pack
             else str(request.dtype).removeprefix("torch."))
    parts.append(f"float linears: {dense}")
    return "; ".join(parts)


class _Builder:
    def __init__(self, kernels, dtype: torch.dtype, bits: int | None, pack: bool, cache: TuningCache,
                 tied_embedding: str | None) -> None:
        self.kernels, self.dtype, self.bits, self.pack, self.cache = kernels, dtype, bits, pack, cache
        self.tied_embedding = tied_embedding  # the embedding the LM head shares its weight with
        self.rows = functools.partial(dequantize_rows, kernels=kernels)

    @property
    def rewrites_dense(self) -> bool:
        return self.bits is not None or self.pack

    def from_blocks(self, model: nn.Module, name: str, parts: list) -> None:
        # Floats where a rank's slice cut the file's blocks: int8 groups (within half a step).
        if any(isinstance(p, torch.Tensor) for p in parts):
            log.info("%s: this rank's slice cuts the file's blocks; its part is held in int8 groups", name)
        weight = pack_parts(parts, self.kernels, bits=8)
        module = model.get_submodule(name)
        if isinstance(module, VocabEmbedding):
            module.look_up_in(weight, self.rows, self.dtype)
            if name == self.tied_embedding:
                head = model.lm_head
                _swap(model, "lm_head", CpuLinear(head.out_features, head.in_features, head.bias, weight,
                                                  kernels=self.kernels))
            return
        _swap(model, name, CpuLinear(module.out_features, module.in_features, module.bias, weight,
                                     kernels=self.kernels))

    def stage(self, model: nn.Module) -> None:
        """A float32 model's linears that will be quantized hold their weights in bf16 until
        then, so that loading never holds a float32 copy of them: a GGUF's float blocks and
        16-bit checkpoints are exact in bf16 either way (tests/test_quantized_weight.py)."""
        if self.dtype != torch.float32 or self.bits is None:
            return
        shared = {id(m.weight) for m in model.modules() if isinstance(m, nn.Embedding)}
        for module in model.modules():
            if type(module) is nn.Linear and module.weight is not None and id(module.weight) not in shared:
                module.weight = nn.Parameter(torch.empty_like(module.weight, dtype=torch.bfloat16), requires_grad=False)

    def from_dense(self, model: nn.Module, name: str) -> None:
        """A loaded nn.Linear as a CpuLinear: quantized (bits), or packed for oneDNN (bf16)."""
        dense = model.get_submodule(name)
        if type(dense) is not nn.Linear or not self.rewrites_dense:
            return
        w = dense.weight.detach()
        if self.bits is None:
            _swap(model, name, CpuLinear(dense.out_features, dense.in_features, dense.bias, dense=w, pack=True))
            return
        layer = CpuLinear(dense.out_features, dense.in_features, dense.bias, quantize_weight(w, self.bits, self.kernels),
                          kernels=self.kernels)
        _swap(model, name, layer)
        # An LM head tied to the embedding, in int8 groups, holds the embedding too: rows are
        # looked up there and the float table goes (vocab x hidden x 4 bytes: 108 MiB of
        # SmolLM2's 135M parameters). In int4 the table keeps its own floats.
        if name == "lm_head" and self.tied_embedding is not None and self.bits == 8:
            model.get_submodule(self.tied_embedding).look_up_in(layer.quantized, self.rows, self.dtype)

    def finish(self, model: nn.Module) -> None:
        for name in [name for name, m in model.named_modules() if type(m) is nn.Linear]:
            self.from_dense(model, name)
        tune_padding([m for m in model.modules() if isinstance(m, CpuLinear)], self.cache)


def _swap(model: nn.Module, name: str, layer: nn.Module) -> None:
    parent, _, attr = name.rpartition(".")
    setattr(model.get_submodule(parent) if parent else model, attr, layer)
