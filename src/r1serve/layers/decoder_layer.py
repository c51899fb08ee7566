"""The pre-norm decoder layer both Llama and DeepSeek-V3 stack: norm, attention, norm, MLP.

The residual stream is carried separately from the layer output so each RMSNorm can fuse
the residual add (one pass over the hidden state instead of two). Subclasses set
input_layernorm, self_attn, post_attention_layernorm and mlp.

Decode-only steps go through the `decode_layer` op, which a platform may bind to a kernel
for the whole layer; its twin runs the modules as any other step does. On a CPU a decode
step of a small model spends a quarter of its time in Python between kernels (module
calls, wrappers), which a whole-layer kernel skips.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import nn

from r1serve.layers.activation import SiluAndMul
from r1serve.layers.attention import PagedAttention, RotaryKVWrite
from r1serve.layers.norm import RMSNorm


@dataclass(frozen=True)
class GatedAttentionParts:
    """A layer of the Llama shape, in the order a decode step runs its parts: norm, fused
    q/k/v projection, rotary + KV cache write, paged attention, output projection, norm,
    fused gate/up projection, SiLU-and-multiply, down projection; `all_reduce` sums a
    tensor-parallel group's partial results after o_proj and down_proj (the identity on
    one rank)."""

    input_norm: RMSNorm
    qkv_proj: nn.Module
    rotary_kv_write: RotaryKVWrite
    attn: PagedAttention
    o_proj: nn.Module
    post_norm: RMSNorm
    gate_up_proj: nn.Module
    act: SiluAndMul
    down_proj: nn.Module
    all_reduce: Callable[[torch.Tensor], torch.Tensor]


class PreNormDecoderLayer(nn.Module):
    kernel_ops = ("decode_layer",)  # what a platform's bind may swap (platforms/base.py)

    def __init__(self) -> None:
        super().__init__()
        self.decode_layer = self.run_modules  # (rope, x, residual, kv_cache, meta) -> (x, residual)

    def forward(self, rope, x, residual, kv_cache, meta):
        if meta.is_decode_only:
            return self.decode_layer(rope, x, residual, kv_cache, meta)
        return self.run_modules(rope, x, residual, kv_cache, meta)

    def run_modules(self, rope, x, residual, kv_cache, meta):
        if residual is None:
            x, residual = self.input_layernorm(x), x
        else:
            x, residual = self.input_layernorm(x, residual)
        x = self.self_attn(rope, x, kv_cache, meta)
        x, residual = self.post_attention_layernorm(x, residual)
        return self.mlp(x), residual

    def gated_attention_parts(self) -> GatedAttentionParts | None:
        """The layer's parts where it has the Llama shape (what a whole-layer kernel takes);
        None for other shapes (MLA, MoE)."""
        return None
