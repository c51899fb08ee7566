"""Llama (SmolLM2, R1-Distill-Llama) over a flattened, paged batch.

All sequences of a step are concatenated into one (N, hidden) tensor; only attention
needs to know where one sequence ends and the next begins (AttentionMetadata).
"""
from __future__ import annotations

from typing import Iterable

import torch
from torch import nn

from r1serve.parallel.tensor_parallel import TensorParallel
from r1serve.errors import ModelLoadError
from r1serve.layers.attention import PagedAttention, RotaryKVWrite
from r1serve.kernels.attention_metadata import AttentionMetadata
from r1serve.layers.kv_cache_spec import KVCacheSpec
from r1serve.layers.embedding import VocabEmbedding
from r1serve.layers.decoder_layer import GatedAttentionParts, PreNormDecoderLayer
from r1serve.layers.mlp import GatedMLP
from r1serve.layers.norm import RMSNorm
from r1serve.layers.rotary import RotaryEmbedding
from r1serve.models.arch_config import ArchConfig
from r1serve.models.causal_lm import CausalLM, WeightPart
from r1serve.models.checkpoint_slice import Selection, TensorSlice, vocab_rows


class LlamaAttention(nn.Module):
    """Under tensor parallelism a rank holds num_heads / size query heads and the KV heads
    they read; o_proj's partial sums meet in one all-reduce."""

    def __init__(self, cfg: ArchConfig, tp: TensorParallel) -> None:
        super().__init__()
        (h0, h1), (k0, k1) = tp.split(cfg.num_heads, "num_attention_heads"), tp.kv_heads(cfg.num_kv_heads)
        self.n_heads, self.n_kv_heads, self.head_dim = h1 - h0, k1 - k0, cfg.head_dim
        self.tp = tp
        # q, k and v projections fused into one GEMM; load_weights fills the three slices.
        self.qkv_proj = nn.Linear(cfg.hidden_size, (self.n_heads + 2 * self.n_kv_heads) * self.head_dim,
                                  bias=cfg.attention_bias)
        self.o_proj = nn.Linear(self.n_heads * self.head_dim, cfg.hidden_size, bias=False)
        self.rotary_kv_write = RotaryKVWrite(self.n_heads)
        self.attn = PagedAttention(self.n_heads, self.n_kv_heads, self.head_dim)

    def forward(self, rope, x: torch.Tensor, kv_cache: torch.Tensor, meta: AttentionMetadata) -> torch.Tensor:
        # q, k, v from one GEMM; q and k rotated; k and v stored in the cache (one fused kernel on the CPU)
        q = self.rotary_kv_write(self.qkv_proj(x), rope, kv_cache, meta)  # (N, H, D)
        return self.tp.all_reduce(self.o_proj(self.attn(q, kv_cache, meta)))


class LlamaDecoderLayer(PreNormDecoderLayer):
    def __init__(self, cfg: ArchConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = LlamaAttention(cfg, tp)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = GatedMLP(cfg.hidden_size, cfg.intermediate_size, tp)

    def gated_attention_parts(self) -> GatedAttentionParts:
        a, m = self.self_attn, self.mlp
        return GatedAttentionParts(self.input_layernorm, a.qkv_proj, a.rotary_kv_write, a.attn, a.o_proj,
                                   self.post_attention_layernorm, m.gate_up_proj, m.act, m.down_proj,
                                   a.tp.all_reduce)


class LlamaModel(nn.Module):
    def __init__(self, cfg: ArchConfig, tp: TensorParallel) -> None:
        super().__init__()
        self.embed_tokens = VocabEmbedding(cfg.vocab_size, cfg.hidden_size, tp)
        self.rotary = RotaryEmbedding(cfg.head_dim, cfg.max_position_embeddings, cfg.rope_theta, cfg.rope_scaling)
        self.layers = nn.ModuleList(LlamaDecoderLayer(cfg, tp) for _ in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)

    def forward(self, input_ids, positions, kv_caches: list[torch.Tensor], meta: AttentionMetadata):
        x, residual = self.embed_tokens(input_ids), None  # (N, hidden)
        rope = self.rotary(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(rope, x, residual, kv_cache, meta)
        x, _ = self.norm(x, residual)
        return x


class LlamaForCausalLM(CausalLM):
    # HF checkpoint names of the weights that are fused here: name -> (fused name, slice index)
    FUSED = {"q_proj": ("qkv_proj", 0), "k_proj": ("qkv_proj", 1), "v_proj": ("qkv_proj", 2),
             "gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}

    rewrite_linears_as_loaded = True  # parameters are looked up one tensor at a time

    def __init__(self, cfg: ArchConfig, tp: TensorParallel = TensorParallel()) -> None:
        super().__init__(cfg, LlamaModel(cfg, tp), tp)

    def kv_cache_spec(self) -> KVCacheSpec:
        # A rank caches only its own KV heads.
        return KVCacheSpec.key_value(self.arch.num_layers, self.model.layers[0].self_attn.n_kv_heads, self.arch.head_dim)

    def checkpoint_slice(self, name: str) -> Selection:
        """What this rank reads of a checkpoint tensor: its heads of q, k, v (rows) and o
        (columns), its columns of the MLP, its rows of the vocabulary."""
        tp, c, d = self.tp, self.arch, self.arch.head_dim
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return TensorSlice(0, *tp.padded_split(c.vocab_size))
        part = name.split(".")[-2] if name.startswith("model.layers.") else ""
        if part in ("q_proj", "o_proj"):
            h0, h1 = tp.split(c.num_heads, "num_attention_heads")
            return TensorSlice(0 if part == "q_proj" else 1, h0 * d, h1 * d)
        if part in ("k_proj", "v_proj"):
            k0, k1 = tp.kv_heads(c.num_kv_heads)
            return TensorSlice(0, k0 * d, k1 * d)
        if part in ("gate_proj", "up_proj", "down_proj"):
            i0, i1 = tp.split(c.intermediate_size, "intermediate_size")
            return TensorSlice(1 if part == "down_proj" else 0, i0, i1)
        return None

    def weight_part(self, checkpoint_name: str) -> WeightPart | None:
        if not checkpoint_name.endswith(".weight") or "rotary_emb" in checkpoint_name:
            return None
        if checkpoint_name == "lm_head.weight" and self.arch.tie_word_embeddings:
            return None
        target, idx = self._fused_target(checkpoint_name)
        module = target.removesuffix(".weight")
        try:
            whole = self.get_submodule(module)
        except AttributeError:
            return None
        if not isinstance(whole, (nn.Linear, nn.Embedding)):
            return None
        if idx is None:
            rows = whole.out_features if isinstance(whole, nn.Linear) else whole.num_embeddings
            return WeightPart(module, 0, 1, rows)
        rows = self._fused_rows(checkpoint_name)
        return WeightPart(module, idx, len(rows), rows[idx])

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy each (name, tensor) into its parameter; returns the names loaded."""
        loaded: set[str] = set()
        for name, tensor in weights:
            if "rotary_emb" in name or (name == "lm_head.weight" and self.arch.tie_word_embeddings):
                continue
            target, slice_idx = self._fused_target(name)
            try:  # one lookup per tensor: a linear rewritten once loaded no longer has this weight
                param = self.get_parameter(target)
            except AttributeError:
                raise ModelLoadError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}") from None
            with torch.no_grad():
                self._copy(param, tensor, slice_idx, name)
            loaded.add(name)
        return loaded

    def param_name(self, checkpoint_name: str) -> str:
        """The parameter a checkpoint tensor is loaded into (q, k and v share qkv_proj's)."""
        return self._fused_target(checkpoint_name)[0]

    def _fused_target(self, name: str) -> tuple[str, int | None]:
        for part, (fused, idx) in self.FUSED.items():
            if f".{part}." in name:
                return name.replace(f".{part}.", f".{fused}."), idx
        return name, None

    def _copy(self, param: torch.Tensor, tensor: torch.Tensor, slice_idx: int | None, name: str) -> None:
        dst = param if slice_idx is None else self._fused_slice(param, slice_idx, name)
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            dst = vocab_rows(dst, tensor)
        if dst.shape != tensor.shape:
            raise ModelLoadError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                 f"the model expects {tuple(dst.shape)}")
        dst.copy_(tensor)

    def _fused_slice(self, param: torch.Tensor, idx: int, name: str) -> torch.Tensor:
        return param.split(self._fused_rows(name), dim=0)[idx]

    def _fused_rows(self, name: str) -> list[int]:
        # The rows of each part of a fused parameter on this rank: [gate | up], [q | k | v].
        if ".mlp." in name:
            return [self.model.layers[0].mlp.down_proj.in_features] * 2
        attn, d = self.model.layers[0].self_attn, self.arch.head_dim
        return [attn.n_heads * d, attn.n_kv_heads * d, attn.n_kv_heads * d]

    def check_complete(self, loaded: set[str]) -> None:
        """Raise unless the checkpoint names loaded (as floats or as blocks) cover the model."""
        expected = {f"model.layers.{i}.self_attn.{p}_proj.weight" for i in range(self.arch.num_layers) for p in "qkvo"}
        expected |= {"model.embed_tokens.weight", "model.norm.weight"}
        if not self.arch.tie_word_embeddings:
            expected.add("lm_head.weight")
        missing = sorted(expected - loaded)
        if missing:
            raise ModelLoadError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
