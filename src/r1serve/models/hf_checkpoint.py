"""An HF-format model directory: config.json, *.safetensors (sharded or not), tokenizer files."""
from __future__ import annotations

import json
from pathlib import Path
from typing import Iterator

import torch
from safetensors import safe_open

from r1serve.errors import ModelLoadError


class HFCheckpoint:
    def __init__(self, path: Path, hf_config: dict, shards: list[Path]) -> None:
        self.path = path
        self.hf_config = hf_config
        self.shards = shards

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

    def iter_weights(self) -> Iterator[tuple[str, torch.Tensor]]:
        # One tensor at a time, shard by shard: peak memory stays near the model's own size.
        for shard in self.shards:
            try:
                with safe_open(str(shard), framework="pt") as f:
                    for name in f.keys():
                        yield name, f.get_tensor(name)
            except Exception as e:  # safetensors raises several types for a damaged file
                if isinstance(e, ModelLoadError):
                    raise
                raise ModelLoadError(f"cannot read {shard}: {e}; the file may be truncated or corrupt") from None

    def tokenizer(self):
        from r1serve.tokenizer import Tokenizer

        return Tokenizer.from_dir(self.path)


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
