"""Which Triton kernel serves which layer on the cuda platform, and when a twin serves instead.

Imported by platforms/cuda/__init__.py only where triton imports. Each dispatcher takes the kernel
where its shapes fit (decode-only steps, power-of-two head sizes) and the plain-torch twin
otherwise: prefill attention stays on the twin (SDPA over the gathered pages), and so do
head sizes a kernel's tiles cannot take (head_dim 80 or 96, the tiny test models' 8-wide
rope) rather than failing. Cache writes always take the kernel: it skips the negative slots
that pad CUDA graph batches, where the twins' index_put would wrap around.
"""
from __future__ import annotations

import torch
from torch import nn

from r1serve.kernels.mla_attention import mla_absorbed_reference
from r1serve.kernels.paged_attention import paged_attention_reference
from r1serve.kernels.rms_norm import add_rms_norm_reference
from r1serve.kernels.triton import next_power_of_2
from r1serve.kernels.triton.add_rms_norm import MAX_HIDDEN, add_rms_norm_triton
from r1serve.kernels.triton.fp8_act_quant import act_quant_triton
from r1serve.kernels.triton.fp8_gemm import fp8_block_gemm_triton
from r1serve.kernels.triton.fused_moe import fused_moe_fp8_triton, fused_moe_triton
from r1serve.kernels.triton.kv_cache_write import write_kv_triton, write_latent_triton
from r1serve.kernels.triton.mla_decode_attention import mla_decode_attention_triton
from r1serve.kernels.triton.paged_decode_attention import paged_decode_attention_triton
from r1serve.kernels.triton.rotary_kv_write import rotary_kv_write_triton
from r1serve.kernels.attention_metadata import AttentionMetadata
from r1serve.layers.rotary import apply_rotary
from r1serve.platforms.base import Kernel, KernelTable
from r1serve.platforms.cuda.fp8_linear import Fp8Experts


def _pow2(n: int, least: int) -> bool:
    return n >= least and n == next_power_of_2(n)


def paged_attention(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor, meta: AttentionMetadata,
                    scale: float) -> torch.Tensor:
    if meta.is_decode_only and _pow2(q.shape[-1], 16):
        return paged_decode_attention_triton(q, k_cache, v_cache, meta, scale)
    return paged_attention_reference(q, k_cache, v_cache, meta, scale)


def mla_absorbed(q_lat: torch.Tensor, q_pe: torch.Tensor, cache: torch.Tensor, meta: AttentionMetadata,
                 kv_lora_rank: int, scale: float) -> torch.Tensor:
    if meta.is_decode_only and _pow2(kv_lora_rank, 16) and _pow2(q_pe.shape[-1], 16):
        return mla_decode_attention_triton(q_lat, q_pe, cache, meta, kv_lora_rank, scale)
    return mla_absorbed_reference(q_lat, q_pe, cache, meta, kv_lora_rank, scale)


def rotary_kv_write(qkv: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, kv_cache: torch.Tensor,
                    slot_mapping: torch.Tensor, num_heads: int) -> torch.Tensor:
    if _pow2(kv_cache.shape[-1], 4) and qkv.stride(1) == 1 and cos.stride(-1) == 1:
        return rotary_kv_write_triton(qkv, cos, sin, kv_cache, slot_mapping, num_heads)
    # Other head sizes: rotate with torch, but still write with the kernel. The twin's
    # index_put would send the graph runner's padding slot -1 to the cache's last slot,
    # which may be a live sequence's; the kernel skips it.
    N, (Hkv, D) = qkv.shape[0], kv_cache.shape[-2:]
    q, k, v = qkv.split([num_heads * D, Hkv * D, Hkv * D], dim=-1)
    q, k = apply_rotary(q.reshape(N, num_heads, D), k.reshape(N, Hkv, D), (cos, sin))
    write_kv_triton(kv_cache[0], kv_cache[1], k, v.reshape(N, Hkv, D), slot_mapping)
    return q


def add_rms_norm(x: torch.Tensor | None, residual: torch.Tensor, weight: torch.Tensor,
                 eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    if residual.dim() == 2 and residual.is_contiguous() and (x is None or x.is_contiguous()):
        return add_rms_norm_triton(x, residual, weight, eps)
    return add_rms_norm_reference(x, residual, weight, eps)


def _small_norm(module: nn.Module) -> bool:
    return module.weight.shape[0] <= MAX_HIDDEN


def _bf16_experts(module: nn.Module) -> bool:
    return not isinstance(module.moe_experts, Fp8Experts)  # FP8 experts bind their own op


def triton_table() -> KernelTable:
    """op -> Triton kernel (the dispatchers above keep the twins for what a kernel does not take)."""
    return {
        "paged_attention": Kernel(paged_attention, "triton"),
        "rotary_kv_write": Kernel(rotary_kv_write, "triton"),
        "mla_write_latent": Kernel(write_latent_triton, "triton"),
        "mla_absorbed": Kernel(mla_absorbed, "triton"),
        "add_rms_norm": Kernel(add_rms_norm, "triton", _small_norm),
        "moe_experts": Kernel(fused_moe_triton, "triton", _bf16_experts),
        "fp8_moe": Kernel(fused_moe_fp8_triton, "triton"),
        "fp8_act_quant": Kernel(act_quant_triton, "triton"),
        "fp8_block_gemm": Kernel(fp8_block_gemm_triton, "triton"),
    }
