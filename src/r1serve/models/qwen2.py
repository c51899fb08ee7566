"""Qwen2 (R1-Distill-Qwen): Llama's layout with bias on the q, k and v projections."""
from __future__ import annotations

from dataclasses import replace

from r1serve.parallel.tensor_parallel import TensorParallel
from r1serve.models.arch_config import ArchConfig
from r1serve.models.llama import LlamaForCausalLM


class Qwen2ForCausalLM(LlamaForCausalLM):
    def __init__(self, cfg: ArchConfig, tp: TensorParallel = TensorParallel()) -> None:
        super().__init__(replace(cfg, attention_bias=True), tp)
