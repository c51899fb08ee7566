"""Keeping a checkpoint's FP8 block weights as FP8, for platforms with FP8 GEMMs (Hopper and newer).

The loader dequantizes FP8 tensors as it reads them (models/hf_checkpoint.py), which every
platform can run. Where the GPU has FP8 GEMMs, the cuda platform's weight plan
(platforms/cuda/__init__.py) then hands the FP8 tensors over again once loading is done,
after `model.load_weights(...)` (which still needs every tensor: the absorbed MLA weights
and its completeness check come from it) and before `platform.bind`:

    keep_fp8_weights(model, iter_fp8_block_weights(ckpt), ckpt.fp8_block)

Each FP8 tensor and its scales go where load_weights put the dequantized copy, including
the fused (gate_up_proj) and stacked (experts' w13 / w2) parameters. Then every nn.Linear
whose weight is wholly FP8 becomes an Fp8BlockLinear and every DeepseekMoE's experts an
Fp8Experts (platforms/cuda/fp8_linear.py), and the 16-bit copies are freed. Linears whose input
width is not a whole number of column blocks keep their dequantized weight (activations are
quantized per block of columns), as do fused parameters of models without `weight_slice` (their
FP8 checkpoints are not published). bind then sets the Triton kernels on them.

Until the swap both copies are resident (the FP8 one is half the size of a bf16 one): a
loader that streams each FP8 tensor straight into an FP8 parameter would avoid that, and
needs this module's placement logic, not its order.
"""
from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Iterable, Iterator

import torch
from safetensors import safe_open
from torch import nn

from r1serve.errors import ModelLoadError
from r1serve.platforms.cuda.fp8_linear import Fp8BlockLinear, Fp8Experts
from r1serve.layers.moe import DeepseekMoE

log = logging.getLogger("r1serve.platforms")


@dataclass
class _Fp8Param:
    weight: torch.Tensor  # the parameter's shape, float8_e4m3fn
    scale: torch.Tensor  # (..., ceil(out / b0), ceil(in / b1)) float32
    filled: int = 0  # weight elements written so far


def iter_fp8_block_weights(ckpt) -> Iterator[tuple[str, torch.Tensor, torch.Tensor]]:
    """(name, float8 weight, weight_scale_inv) for every FP8 tensor of an HF checkpoint, one at a time."""
    shard_of = {}
    for shard in ckpt.shards:
        with safe_open(str(shard), framework="pt") as f:
            shard_of.update(dict.fromkeys(f.keys(), shard))
    for shard in ckpt.shards:
        with safe_open(str(shard), framework="pt") as f:
            for name in f.keys():
                if name.endswith("_scale_inv") or f.get_slice(name).get_dtype() != "F8_E4M3":
                    continue
                scale_shard = shard_of.get(f"{name}_scale_inv")
                if scale_shard is None:
                    raise ModelLoadError(f"the checkpoint has no {name}_scale_inv for its FP8 weight")
                with safe_open(str(scale_shard), framework="pt") as s:
                    yield name, f.get_tensor(name), s.get_tensor(f"{name}_scale_inv")


def keep_fp8_weights(model: nn.Module, tensors: Iterable[tuple[str, torch.Tensor, torch.Tensor]],
                     block: tuple[int, int]) -> list[str]:
    """Swap in FP8 linears and experts; returns the names of the parameters now held in FP8."""
    params = dict(model.named_parameters())
    store: dict[str, _Fp8Param] = {}
    for name, weight, scale in tensors:
        target = model.param_name(name) if hasattr(model, "param_name") else name
        if target not in params:
            continue  # a tensor the model skips (R1's multi-token-prediction layer)
        entry = store.get(target)
        if entry is None:
            entry = store[target] = _new_entry(params[target], block)
        if _place(model, name, target, entry, weight, scale, block):
            entry.filled += weight.numel()
    kept = [t for t, e in store.items() if e.filled == e.weight.numel()]
    swapped = _swap_linears(model, {t: store[t] for t in kept}, block) + _swap_experts(model, store, kept, block)
    log.info("kept %d weights in FP8 (%s blocks); %d stay dequantized", len(swapped), block, len(store) - len(swapped))
    return swapped


def _new_entry(param: torch.Tensor, block: tuple[int, int]) -> _Fp8Param:
    *lead, out, inp = param.shape
    scale_shape = (*lead, -(-out // block[0]), -(-inp // block[1]))
    return _Fp8Param(torch.empty(param.shape, dtype=torch.float8_e4m3fn, device=param.device),
                     torch.empty(scale_shape, dtype=torch.float32, device=param.device))


def _place(model: nn.Module, name: str, target: str, entry: _Fp8Param, weight: torch.Tensor, scale: torch.Tensor,
           block: tuple[int, int]) -> bool:
    """Copy one checkpoint tensor and its scales into its slice of the FP8 parameter."""
    if target == name and entry.weight.dim() == 2:
        w_dst, s_dst = entry.weight, entry.scale
    elif hasattr(model, "weight_slice"):  # the model's own loader slicing: fused halves, stacked experts
        w_dst = model.weight_slice(name, {target: entry.weight})
        s_dst = _scale_slice(entry, w_dst, block)
        if s_dst is None:
            log.info("%s: its part of %s starts inside a %s block; kept dequantized", name, target, block)
            return False
    else:
        return False
    if w_dst.shape != weight.shape or s_dst.shape != scale.shape:
        raise ModelLoadError(f"FP8 tensor {name!r} {tuple(weight.shape)} with scales {tuple(scale.shape)} does not "
                             f"fit {target!r}: expected {tuple(w_dst.shape)} and {tuple(s_dst.shape)}")
    with torch.no_grad():
        w_dst.copy_(weight)
        s_dst.copy_(scale)
    return True


def _scale_slice(entry: _Fp8Param, w_dst: torch.Tensor, block: tuple[int, int]) -> torch.Tensor | None:
    # The rows of the weight slice, read back from its offset in the full (..., out, in) tensor,
    # give the scale rows: whole blocks only.
    out, inp = entry.weight.shape[-2:]
    lead, rest = divmod(w_dst.storage_offset(), out * inp)
    row0, rows = rest // inp, w_dst.shape[-2]
    if row0 % block[0] or (rows % block[0] and row0 + rows != out):
        return None
    scales = entry.scale[lead] if entry.weight.dim() == 3 else entry.scale
    return scales[row0 // block[0]: -(-(row0 + rows) // block[0])]


def _swap_linears(model: nn.Module, store: dict[str, _Fp8Param], block: tuple[int, int]) -> list[str]:
    swapped = []
    for target, entry in store.items():
        owner_name, _, attr = target.rpartition(".")
        owner = model.get_submodule(owner_name)
        if not (isinstance(owner, nn.Linear) and attr == "weight"):
            continue
        if owner.in_features % block[1]:
            log.info("%s: in_features %d is not a multiple of %d; kept dequantized", target, owner.in_features, block[1])
            continue
        parent_name, _, child = owner_name.rpartition(".")
        setattr(model.get_submodule(parent_name), child, Fp8BlockLinear(entry.weight, entry.scale, block, owner.bias))
        swapped.append(target)
    return swapped


def _swap_experts(model: nn.Module, store: dict[str, _Fp8Param], kept: list[str], block: tuple[int, int]) -> list[str]:
    swapped = []
    for name, moe in model.named_modules():
        w13, w2 = f"{name}.w13", f"{name}.w2"
        if not (isinstance(moe, DeepseekMoE) and w13 in kept and w2 in kept):
            continue
        if moe.w13.shape[-1] % block[1] or moe.w2.shape[-1] % block[1]:
            log.info("%s: expert widths are not multiples of %d; kept dequantized", name, block[1])
            continue
        moe.moe_experts = Fp8Experts(store[w13].weight, store[w13].scale, store[w2].weight, store[w2].scale, block)
        for attr in ("w13", "w2"):  # the dequantized copies go; the FP8 experts never read them
            old = getattr(moe, attr)
            setattr(moe, attr, nn.Parameter(old.new_empty(0, *old.shape[1:]), requires_grad=False))
        swapped += [w13, w2]
    return swapped
