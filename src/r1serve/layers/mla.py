"""Multi-head latent attention (DeepSeek-V2/V3), named as the paper and checkpoints name it.

    x ─ q_a_proj ─ q_a_layernorm ─ q_b_proj ─> [q_nope | q_pe] per head   (or q_proj when q_lora_rank is null)
    x ─ kv_a_proj_with_mqa ─> [c_kv | k_pe] ;  c_kv ─ kv_a_layernorm ─> the latent that is cached
    q_pe, k_pe get RoPE (decoupled: k_pe is one head shared by all)

The paged cache holds [c_kv | k_pe] per token (see kernels/mla_attention.py for the layout and
the two ways to attend). Decode-only steps use the absorbed form; steps with prefill use the
expanded one. `form` pins either, for tests and for measuring.

Under tensor parallelism a rank holds num_heads / size heads of q_b_proj (or q_proj),
kv_b_proj and o_proj, and o_proj's partial sums meet in one all-reduce. The latent is one
vector per token for all heads, so every rank computes and caches the whole of it for
the batch's sequences: TP divides MLA's weights, not its cache (vLLM and SGLang do the
same; data-parallel attention is what divides the cache).
"""
from __future__ import annotations

from dataclasses import dataclass, replace

import torch
from torch import nn

from r1serve.parallel.tensor_parallel import TensorParallel
from r1serve.kernels.mla_attention import mla_absorbed_reference, mla_expanded_reference, write_latent
from r1serve.kernels.attention_metadata import AttentionMetadata
from r1serve.layers.norm import RMSNorm
from r1serve.layers.rotary import apply_rotary_interleaved


@dataclass(frozen=True)
class MLAConfig:
    hidden_size: int
    num_heads: int
    q_lora_rank: int | None
    kv_lora_rank: int
    qk_nope_head_dim: int
    qk_rope_head_dim: int
    v_head_dim: int
    rms_norm_eps: float
    softmax_scale: float
    attention_bias: bool = False

    @property
    def qk_head_dim(self) -> int:
        return self.qk_nope_head_dim + self.qk_rope_head_dim

    @property
    def latent_dim(self) -> int:
        return self.kv_lora_rank + self.qk_rope_head_dim


class MLAAttention(nn.Module):
    kernel_ops = ("mla_write_latent", "mla_absorbed")  # what a platform's bind may swap (platforms/base.py)

    def __init__(self, c: MLAConfig, tp: TensorParallel = TensorParallel()) -> None:
        super().__init__()
        h0, h1 = tp.split(c.num_heads, "num_attention_heads")
        self.c = c = replace(c, num_heads=h1 - h0)  # this rank's heads
        self.tp = tp
        self.form = "auto"  # "auto" | "absorbed" | "expanded"
        self.mla_write_latent = write_latent  # (cache, latent (N, L + R), slot_mapping) -> None
        self.mla_absorbed = mla_absorbed_reference  # (q_lat, q_pe, cache, meta, kv_lora_rank, scale) -> (N, H, L)
        H = c.num_heads
        if c.q_lora_rank is None:
            self.q_proj = nn.Linear(c.hidden_size, H * c.qk_head_dim, bias=False)
        else:
            self.q_a_proj = nn.Linear(c.hidden_size, c.q_lora_rank, bias=c.attention_bias)
            self.q_a_layernorm = RMSNorm(c.q_lora_rank, c.rms_norm_eps)
            self.q_b_proj = nn.Linear(c.q_lora_rank, H * c.qk_head_dim, bias=False)
        self.kv_a_proj_with_mqa = nn.Linear(c.hidden_size, c.latent_dim, bias=c.attention_bias)
        self.kv_a_layernorm = RMSNorm(c.kv_lora_rank, c.rms_norm_eps)
        self.kv_b_proj = nn.Linear(c.kv_lora_rank, H * (c.qk_nope_head_dim + c.v_head_dim), bias=False)
        # A row-parallel bias is added once, by rank 0.
        self.o_proj = nn.Linear(H * c.v_head_dim, c.hidden_size, bias=c.attention_bias and tp.is_first)
        # kv_b_proj split per head for the absorbed form; filled by absorb_weights() after loading.
        self.register_buffer("w_uk", torch.empty(H, c.qk_nope_head_dim, c.kv_lora_rank), persistent=False)
        self.register_buffer("w_uv", torch.empty(H, c.v_head_dim, c.kv_lora_rank), persistent=False)

    def absorb_weights(self) -> None:
        """Split kv_b_proj (H*(P+V), L) into W_UK (H, P, L) and W_UV (H, V, L); call after loading
        weights and before the platform repacks the linears."""
        c = self.c
        w = self.kv_b_proj.weight.detach().view(c.num_heads, c.qk_nope_head_dim + c.v_head_dim, c.kv_lora_rank)
        self.w_uk, self.w_uv = (t.contiguous() for t in w.split([c.qk_nope_head_dim, c.v_head_dim], dim=1))

    def _query(self, x: torch.Tensor) -> torch.Tensor:
        if self.c.q_lora_rank is None:
            return self.q_proj(x)
        return self.q_b_proj(self.q_a_layernorm(self.q_a_proj(x)))

    def forward(self, rope, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        c, N = self.c, x.shape[0]
        q = self._query(x).view(N, c.num_heads, c.qk_head_dim)
        q_nope, q_pe = q.split([c.qk_nope_head_dim, c.qk_rope_head_dim], dim=-1)  # (N, H, P), (N, H, R)
        c_kv, k_pe = self.kv_a_proj_with_mqa(x).split([c.kv_lora_rank, c.qk_rope_head_dim], dim=-1)
        c_kv = self.kv_a_layernorm(c_kv.contiguous())  # (N, L)
        q_pe = apply_rotary_interleaved(q_pe, rope)
        k_pe = apply_rotary_interleaved(k_pe[:, None], rope)[:, 0]  # (N, R)
        self.mla_write_latent(kv_cache, torch.cat((c_kv, k_pe), dim=-1), meta.slot_mapping)
        if self._absorbed(meta):
            out = self.absorbed(q_nope, q_pe, kv_cache, meta)
        else:
            out = self.expanded(q_nope, q_pe, kv_cache, meta)
        return self.tp.all_reduce(self.o_proj(out.reshape(N, c.num_heads * c.v_head_dim)))

    def _absorbed(self, meta: AttentionMetadata) -> bool:
        return self.form == "absorbed" or (self.form == "auto" and meta.is_decode_only)

    def expanded(self, q_nope, q_pe, kv_cache, meta) -> torch.Tensor:
        c = self.c
        return mla_expanded_reference(q_nope, q_pe, kv_cache, self.kv_b_proj, meta, c.kv_lora_rank, c.v_head_dim,
                                      c.softmax_scale)  # (N, H, V)

    def absorbed(self, q_nope, q_pe, kv_cache, meta) -> torch.Tensor:
        c = self.c
        q_lat = torch.einsum("nhp,hpl->nhl", q_nope, self.w_uk)  # (N, H, L)
        o_lat = self.mla_absorbed(q_lat, q_pe, kv_cache, meta, c.kv_lora_rank, c.softmax_scale)
        return torch.einsum("nhl,hvl->nhv", o_lat, self.w_uv)  # (N, H, V)
