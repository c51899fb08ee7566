"""`r1serve info MODEL`: what a model is, read from its files' headers in a moment (Ollama's
`show`): architecture, parameters, files and size on disk, how each group of weights is
stored, context, KV bytes per token. Nothing is loaded: a GGUF's header and tensor table, a
config.json and the sizes of its shards, or for R1 the built-in config (no download).
"""
from __future__ import annotations

import json
from collections import Counter
from dataclasses import asdict, dataclass
from pathlib import Path

import torch

from r1serve.errors import ModelLoadError
from r1serve.models.catalog import CATALOG
from r1serve.models.planning import numbers_from_config
from r1serve.planner.model import BUILTIN_CONFIGS, read_config

# GGUF tensor names ("blk.3.attn_q.weight", "token_embd.weight", ...) by the part of the
# model they belong to, first match wins.
_GROUPS = ((".bias", "biases"), ("norm", "norms"), ("token_embd", "embedding"), ("attn_", "attention"),
           ("ffn_", "feed-forward"), ("output.", "output head"))


@dataclass(frozen=True)
class ModelCard:
    name: str
    architecture: str
    source: str  # "GGUF file", "HF directory", "built-in config (not downloaded)"
    parameters: int
    active_parameters: int
    context: int  # tokens the model was trained for (max_position_embeddings)
    kv_bytes_per_token: int  # bf16 K and V (MLA: the latent) over all layers
    weights: dict[str, str]  # tensor group -> how it is stored
    files: list[str]
    size_on_disk: int | None  # None: not on disk

    def as_dict(self) -> dict:
        return asdict(self)


def model_card(model: str, cache_dir: Path) -> ModelCard:
    path = Path(model).expanduser()
    if path.exists():
        return _from_path(model, path)
    entry = CATALOG.get(model)
    if entry is not None and entry.is_pulled(cache_dir):
        return _from_path(model, entry.local_path(cache_dir))
    if model.lower() in BUILTIN_CONFIGS:  # R1's and V3's configs ship with r1serve
        return _from_config(model, read_config(model)[1], "built-in config (not downloaded)", [], None)
    if entry is not None:
        raise ModelLoadError(f"{model} is not pulled here, and info does not download: `r1serve pull {model}` first")
    raise ModelLoadError(f"unknown model {model!r}: not an existing path, a catalog name ({', '.join(CATALOG)}) "
                         f"or a built-in config ({', '.join(BUILTIN_CONFIGS)})")


def _from_path(name: str, path: Path) -> ModelCard:
    if path.is_file() and path.suffix == ".gguf":
        return _from_gguf(name, path)
    config = path if path.is_file() else path / "config.json"
    if config.suffix != ".json" or not config.is_file():
        raise ModelLoadError(f"{path} is neither a .gguf file, a config.json nor a directory holding one")
    try:
        hf_config = json.loads(config.read_text())
    except json.JSONDecodeError as e:
        raise ModelLoadError(f"{config} is not valid JSON: {e}") from None
    shards = sorted(config.parent.glob("*.safetensors"))
    source = "HF directory" if shards else "config.json (no weights beside it)"
    return _from_config(name, hf_config, source, shards, sum(s.stat().st_size for s in shards) if shards else None)


def _from_config(name: str, hf_config: dict, source: str, files: list[Path], size: int | None) -> ModelCard:
    quant = hf_config.get("quantization_config") or {}
    stored = hf_config.get("torch_dtype", "bfloat16")
    if quant.get("quant_method") == "fp8":
        block = "x".join(str(b) for b in quant.get("weight_block_size", []))
        stored = f"FP8 {quant.get('fmt', 'e4m3')}" + (f", one scale per {block} block" if block else "")
    rest = "embedding, norms, router" if hf_config.get("n_routed_experts") else "embedding, norms"
    weights = {"linear layers": stored, rest: hf_config.get("torch_dtype", "bfloat16")}
    return _card(name, hf_config, source, weights, files, size)


def _from_gguf(name: str, path: Path) -> ModelCard:
    from r1serve.models.gguf_checkpoint import GGUFCheckpoint

    checkpoint = GGUFCheckpoint.open(path)
    kinds: dict[str, Counter] = {}
    for t in checkpoint.file.tensors:
        group = next((g for key, g in _GROUPS if key in t.name), "other")
        kinds.setdefault(group, Counter())[t.tensor_type.name] += 1
    weights = {group: " + ".join(f"{kind} ({n})" if len(c) > 1 else kind for kind, n in c.most_common())
               for group, c in kinds.items()}
    return _card(name, checkpoint.hf_config, "GGUF file", weights, [path], path.stat().st_size)


def _card(name: str, hf_config: dict, source: str, weights: dict, files: list[Path], size: int | None) -> ModelCard:
    numbers = numbers_from_config(hf_config, torch.bfloat16, 2**30)
    return ModelCard(name, numbers.architecture, source, numbers.parameters, numbers.active_parameters,
                     int(hf_config.get("max_position_embeddings", 0)), numbers.kv_bytes_per_token, weights,
                     [str(f) for f in files], size)


def describe(card: ModelCard) -> str:
    """The card as a person reads it."""
    active = ("all active" if card.active_parameters == card.parameters
              else f"{_count(card.active_parameters)} active per token")
    lines = [f"{card.name}  ({card.architecture}, {card.source})",
             f"  parameters   {_count(card.parameters)} ({active})",
             "  weights      " + " · ".join(f"{group} {kind}" for group, kind in card.weights.items())]
    if card.files:
        shown = card.files[0] if len(card.files) == 1 else f"{len(card.files)} files in {Path(card.files[0]).parent}"
        lines.append(f"  on disk      {shown}, {card.size_on_disk / 1e9:.2f} GB")
    lines += [f"  context      {card.context:,} tokens",
              f"  KV cache     {card.kv_bytes_per_token:,} bytes per token (bf16): "
              f"{2**30 // card.kv_bytes_per_token:,} tokens per GiB"]
    return "\n".join(lines)


def _count(n: int) -> str:
    return f"{n / 1e9:.1f} B" if n >= 1e9 else f"{n / 1e6:.1f} M"
