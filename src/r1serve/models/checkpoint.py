"""A model on disk, whatever its format: a .gguf file or an HF-format directory.

Opening one reads its header and config only (no torch here): the server process opens a
checkpoint for its tokenizer and vocabulary while the engine process loads the weights.
"""
from __future__ import annotations

from pathlib import Path

from r1serve.errors import ModelLoadError


def open_checkpoint(path: Path):
    """A GGUFCheckpoint or an HFCheckpoint: hf_config, tokenizer(), iter_weights(...)."""
    path = Path(path)
    if path.is_file() and path.suffix == ".gguf":
        from r1serve.models.gguf_checkpoint import GGUFCheckpoint

        return GGUFCheckpoint.open(path)
    if path.is_dir():
        from r1serve.models.hf_checkpoint import HFCheckpoint

        return HFCheckpoint.open(path)
    raise ModelLoadError(f"{path} is neither a .gguf file nor an HF model directory")
