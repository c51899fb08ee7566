"""The CPU's kernel for a whole decode step of a Llama-shaped layer (Llama, Qwen2).

It calls the same compiled kernels the layer's modules are bound to, in the same order
and on the same tensors, back to back from one Python function: the output is the
modules' own, bit for bit. What it skips is the Python between them. At one sequence a
SmolLM2 decode step ran ~9 ms, ~6.5 of them in kernels; the rest was twelve module calls,
their wrappers and checks per layer (the C++ checks every argument again). This function
measured 1.32x the tokens/s at one sequence and 1.16x at 32 (docs/performance.md,
benchmarks/cpu_decode_layer.py).

It takes a layer whose four linears all serve from quantized weights (CpuLinear.quantized)
and whose norms are float32 or bf16; layers of any other shape run their modules.
"""
from __future__ import annotations

from typing import Callable

import torch
from torch import nn

from r1serve.layers.decoder_layer import GatedAttentionParts
from r1serve.platforms.cpu.linear import CpuLinear

_NORM_DTYPES = (torch.float32, torch.bfloat16)


def _linears(parts: GatedAttentionParts) -> tuple[nn.Module, ...]:
    return parts.qkv_proj, parts.o_proj, parts.gate_up_proj, parts.down_proj


def takes_layer(layer: nn.Module) -> bool:
    parts = layer.gated_attention_parts()
    if parts is None:
        return False
    quantized = all(isinstance(m, CpuLinear) and m.quantized is not None for m in _linears(parts))
    return quantized and all(n.weight.dtype in _NORM_DTYPES for n in (parts.input_norm, parts.post_norm))


def decode_layer(layer: nn.Module, kernels) -> Callable:
    """The layer's decode step: (rope, x (N, hidden), residual or None, kv_cache, meta) ->
    (x, residual), as layer.run_modules returns them."""
    p = layer.gated_attention_parts()
    gemm, norm, rotary = kernels.quant_linear, kernels.add_rms_norm, kernels.rotary_kv_write
    attention, silu = kernels.paged_decode_attention, kernels.silu_and_mul

    def weights(linear: CpuLinear) -> tuple:
        return linear.qpacked, linear.qsegments, linear.out_features, linear.bias

    qkv, o, gate_up, down = (weights(m) for m in _linears(p))
    w1, eps1, w2, eps2 = p.input_norm.weight, p.input_norm.eps, p.post_norm.weight, p.post_norm.eps
    heads, scale = p.rotary_kv_write.num_heads, p.attn.scale
    all_reduce = p.all_reduce

    def run(rope, x, residual, kv_cache, meta):
        rows = x.shape[0]
        if residual is None:
            h, residual = norm(None, x, w1, eps1)[0], x
        else:
            h, residual = norm(x, residual, w1, eps1)
        cos, sin = rope
        q = rotary(gemm(h, *qkv), cos, sin, kv_cache, meta.slot_mapping, heads)  # (N, H, D)
        a = attention(q, kv_cache[0], kv_cache[1], meta.block_tables, meta.seq_lens_tensor, scale)  # (N, H, D)
        h, residual = norm(all_reduce(gemm(a.view(rows, -1), *o)), residual, w2, eps2)
        return all_reduce(gemm(silu(gemm(h, *gate_up)), *down)), residual

    return run
