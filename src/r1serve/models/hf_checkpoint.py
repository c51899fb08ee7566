"""An HF-format model directory: config.json, *.safetensors (sharded or not), tokenizer files."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import TYPE_CHECKING, Iterator

from safetensors import safe_open

from r1serve.errors import ModelLoadError
from r1serve.models.checkpoint_slice import SKIP, SliceOf, TensorSlice, whole

if TYPE_CHECKING:  # the server process reads config and tokenizer without torch
    import torch


MAPPED_BYTES = 64 << 20


def _stored_bytes(view) -> int:
    shape, dtype = view.get_shape(), view.get_dtype()
    size = {"F64": 8, "I64": 8, "F32": 4, "I32": 4, "BF16": 2, "F16": 2, "I16": 2}.get(dtype, 1)
    return math.prod(shape) * size


class HFCheckpoint:
    def __init__(self, path: Path, hf_config: dict, shards: list[Path]) -> None:
        self.path = path
        self.hf_config = hf_config
        self.shards = shards
        self.fp8_block = _fp8_block_size(hf_config.get("quantization_config"))

    @classmethod
    def open(cls, path: str | Path) -> "HFCheckpoint":
        path = Path(path)
        config_file = path / "config.json"
        if not config_file.is_file():
            raise ModelLoadError(f"{path} has no config.json; an HF model directory needs config.json, "
                                 "*.safetensors and tokenizer.json")
        try:
            hf_config = json.loads(config_file.read_text())
        except json.JSONDecodeError as e:
            raise ModelLoadError(f"{config_file} is not valid JSON: {e}") from None
        return cls(path, hf_config, _find_shards(path))

    def tensor_bytes(self) -> int:
        return sum(shard.stat().st_size for shard in self.shards)

    def iter_weights(self, select: SliceOf = whole, as_blocks=None) -> Iterator[tuple[str, torch.Tensor]]:
        """(name, tensor) one at a time, shard by shard: peak memory stays near the model's own
        size. `select` says what of each tensor this rank reads (checkpoint_slice.py); every
        tensor comes as floats (`as_blocks` is for block formats: safetensors has none)."""
        for shard in self.shards:
            try:
                yield from self._shard_weights(shard, select)
            except Exception as e:  # safetensors raises several types for a damaged file
                if isinstance(e, ModelLoadError):
                    raise
                raise ModelLoadError(f"cannot read {shard}: {e}; the file may be truncated or corrupt") from None

    def _shard_weights(self, shard: Path, select: SliceOf) -> Iterator[tuple[str, torch.Tensor]]:
        # A shard is memory-mapped, and the pages a read touches count as this process's
        # resident memory until the map closes (a column slice touches every row's). Reopened
        # every MAPPED_BYTES, a 5 GB shard costs one rank that much, not its whole size.
        with safe_open(str(shard), framework="pt") as f:
            names = list(f.keys())
        present = set(names)
        todo = [n for n in names if not n.endswith("_scale_inv") and select(n) != SKIP]  # scales come with weights
        while todo:
            with safe_open(str(shard), framework="pt") as f:
                mapped = 0
                while todo and mapped < MAPPED_BYTES:
                    name = todo.pop(0)
                    tensor = self._read(f, name, select(name), f"{name}_scale_inv" in present)
                    mapped += _stored_bytes(f.get_slice(name))
                    yield name, tensor

    def _read(self, f, name: str, part: TensorSlice | None, has_scale: bool) -> torch.Tensor:
        view = f.get_slice(name)
        if view.get_dtype() == "F8_E4M3":
            # Dequantized whole, then sliced: the 128x128 scale blocks need not align with a
            # rank's slice, and one tensor at a time is a transient cost.
            tensor = self._dequantized(name, view[:], f if has_scale else None)
            return tensor if part is None else part.of(tensor).contiguous()
        if part is None:
            return view[:]
        start, stop = part.clipped(view.get_shape()[part.dim])
        index = (slice(None),) * part.dim + (slice(start, stop),)
        return view[index]  # only these rows (or columns) are read from the file

    def _dequantized(self, name: str, weight: torch.Tensor, f) -> torch.Tensor:
        if self.fp8_block is None:
            raise ModelLoadError(f"{name!r} is stored in FP8 but config.json has no fp8 quantization_config")
        scale_name = f"{name}_scale_inv"
        scale = f.get_tensor(scale_name) if f is not None else self._tensor_elsewhere(scale_name)
        from r1serve.kernels.fp8_block import dequantize_fp8_block

        try:
            return dequantize_fp8_block(weight, scale, self.fp8_block)
        except ValueError as e:
            raise ModelLoadError(f"{name!r}: {e}") from None

    def _tensor_elsewhere(self, name: str) -> torch.Tensor:
        # A scale may sit in another shard than its weight: open just that tensor there.
        for shard in self.shards:
            with safe_open(str(shard), framework="pt") as f:
                if name in f.keys():
                    return f.get_tensor(name)
        raise ModelLoadError(f"the checkpoint has no {name!r} for its FP8 weight")

    def tokenizer(self):
        from r1serve.tokenizer import Tokenizer

        return Tokenizer.from_dir(self.path)


def _fp8_block_size(q: dict | None) -> tuple[int, int] | None:
    """R1's quantization_config: fp8, e4m3, 128x128 weight blocks. Anything else is refused."""
    if not q:
        return None
    method, fmt, block = q.get("quant_method"), q.get("fmt", "e4m3"), q.get("weight_block_size")
    if method != "fp8" or fmt != "e4m3" or not (isinstance(block, list) and len(block) == 2):
        raise ModelLoadError(f"quantization_config {q} is not supported; r1serve reads fp8 e4m3 with "
                             "weight_block_size [b0, b1] (DeepSeek-V3/R1's format)")
    return int(block[0]), int(block[1])


def _find_shards(path: Path) -> list[Path]:
    index = path / "model.safetensors.index.json"
    if index.is_file():
        weight_map = json.loads(index.read_text()).get("weight_map", {})
        shards = [path / name for name in dict.fromkeys(weight_map.values())]
        missing = [s.name for s in shards if not s.is_file()]
        if missing:
            raise ModelLoadError(f"{index} lists shards that are missing: {missing}")
        return shards
    shards = sorted(path.glob("*.safetensors"))
    if not shards:
        raise ModelLoadError(f"{path} has no *.safetensors files (other weight formats are not supported)")
    return shards
