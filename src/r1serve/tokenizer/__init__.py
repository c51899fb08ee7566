"""Tokenization: text <-> ids and chat templates, from a model directory or a GGUF file."""

from r1serve.tokenizer.tokenizer import Tokenizer

__all__ = ["Tokenizer"]
