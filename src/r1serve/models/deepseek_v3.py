"""DeepSeek-V3 / R1: multi-head latent attention + DeepSeekMoE, over a flattened paged batch.

Layer i is dense (a plain MLP) for i < first_k_dense_replace, MoE after (every
moe_layer_freq-th layer). Checkpoint names are R1's own: per-expert
`mlp.experts.{e}.gate_proj/up_proj/down_proj` are stacked here into w13 / w2. The
multi-token-prediction layer (`model.layers.{num_hidden_layers}`, models/deepseek_mtp.py)
is loaded only for speculative decoding with it (with_mtp), and skipped otherwise.
"""
from __future__ import annotations

import logging
import re
from dataclasses import dataclass
from typing import Iterable

import torch
from torch import nn

from r1serve.parallel.tensor_parallel import TensorParallel
from r1serve.errors import ModelLoadError
from r1serve.layers.kv_cache_spec import KVCacheSpec
from r1serve.layers.embedding import VocabEmbedding
from r1serve.layers.mla import MLAAttention, MLAConfig
from r1serve.layers.mlp import GatedMLP
from r1serve.layers.moe import DeepseekMoE, MoEConfig
from r1serve.layers.decoder_layer import PreNormDecoderLayer
from r1serve.layers.norm import RMSNorm
from r1serve.layers.rotary import RotaryEmbedding, yarn_mscale
from r1serve.models.arch_config import ArchConfig
from r1serve.models.causal_lm import CausalLM
from r1serve.models.deepseek_mtp import SHARED_WITH_MAIN, DeepseekMTPLayer
from r1serve.models.checkpoint_slice import SKIP, Selection, TensorSlice, vocab_rows

log = logging.getLogger("r1serve.models")


@dataclass(frozen=True)
class DeepseekV3Config:
    arch: ArchConfig
    mla: MLAConfig
    moe: MoEConfig
    first_k_dense_replace: int
    moe_layer_freq: int
    num_nextn_predict_layers: int

    @classmethod
    def from_arch(cls, arch: ArchConfig) -> DeepseekV3Config:
        raw = arch.raw
        try:
            qk_head_dim = raw["qk_nope_head_dim"] + raw["qk_rope_head_dim"]
            mla = MLAConfig(arch.hidden_size, arch.num_heads, raw.get("q_lora_rank"), raw["kv_lora_rank"],
                            raw["qk_nope_head_dim"], raw["qk_rope_head_dim"], raw["v_head_dim"], arch.rms_norm_eps,
                            _softmax_scale(qk_head_dim, arch.rope_scaling), bool(raw.get("attention_bias", False)))
            moe = MoEConfig(arch.hidden_size, raw["moe_intermediate_size"], raw["n_routed_experts"],
                            raw.get("n_shared_experts") or 0, raw["num_experts_per_tok"], raw.get("n_group") or 1,
                            raw.get("topk_group") or 1, bool(raw.get("norm_topk_prob", False)),
                            float(raw.get("routed_scaling_factor", 1.0)), raw.get("scoring_func", "sigmoid"),
                            raw.get("topk_method", "noaux_tc"))
        except KeyError as e:
            raise ModelLoadError(f"a deepseek_v3 config.json needs {e.args[0]!r}") from None
        return cls(arch, mla, moe, raw.get("first_k_dense_replace", 0), raw.get("moe_layer_freq", 1),
                   raw.get("num_nextn_predict_layers", 0))

    def is_moe_layer(self, i: int) -> bool:
        return i >= self.first_k_dense_replace and i % self.moe_layer_freq == 0

    def active_parameters(self, total: int) -> int:
        """Parameters one token uses: all but the routed experts it is not sent to."""
        m = self.moe
        per_expert = 3 * m.hidden_size * m.moe_intermediate_size
        moe_layers = sum(self.is_moe_layer(i) for i in range(self.arch.num_layers))
        return total - moe_layers * (m.n_routed_experts - m.num_experts_per_tok) * per_expert


def _softmax_scale(qk_head_dim: int, scaling: dict | None) -> float:
    # YaRN lengthens the context by stretching positions; the logits are sharpened back by
    # mscale^2 (DeepSeek-V2, appendix; mscale_all_dim applies to the whole head).
    scale = qk_head_dim ** -0.5
    if scaling and scaling.get("rope_type") == "yarn" and scaling.get("mscale_all_dim"):
        scale *= yarn_mscale(scaling["factor"], scaling["mscale_all_dim"]) ** 2
    return scale


class DeepseekV3DecoderLayer(PreNormDecoderLayer):
    def __init__(self, c: DeepseekV3Config, i: int, tp: TensorParallel) -> None:
        super().__init__()
        a = c.arch
        self.input_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.self_attn = MLAAttention(c.mla, tp.dense())
        self.post_attention_layernorm = RMSNorm(a.hidden_size, a.rms_norm_eps)
        self.mlp = DeepseekMoE(c.moe, tp) if c.is_moe_layer(i) else GatedMLP(a.hidden_size, a.intermediate_size,
                                                                              tp.dense())


class DeepseekV3Model(nn.Module):
    def __init__(self, c: DeepseekV3Config, tp: TensorParallel) -> None:
        super().__init__()
        a = c.arch
        self.embed_tokens = VocabEmbedding(a.vocab_size, a.hidden_size, tp.dense())
        self.rotary = RotaryEmbedding(c.mla.qk_rope_head_dim, a.max_position_embeddings, a.rope_theta, a.rope_scaling)
        self.layers = nn.ModuleList(DeepseekV3DecoderLayer(c, i, tp) for i in range(a.num_layers))
        self.norm = RMSNorm(a.hidden_size, a.rms_norm_eps)

    def forward(self, input_ids, positions, kv_caches, meta):
        x, residual = self.embed_tokens(input_ids), None  # (N, hidden)
        rope = self.rotary(positions, x.dtype)
        for layer, kv_cache in zip(self.layers, kv_caches):
            x, residual = layer(rope, x, residual, kv_cache, meta)
        x, _ = self.norm(x, residual)
        return x


_EXPERT = re.compile(r"\.mlp\.experts\.(\d+)\.(gate_proj|up_proj|down_proj)\.weight$")
_FUSED = {"gate_proj": ("gate_up_proj", 0), "up_proj": ("gate_up_proj", 1)}


class DeepseekV3ForCausalLM(CausalLM):
    supports_mtp = True

    def __init__(self, arch: ArchConfig, tp: TensorParallel = TensorParallel(), with_mtp: bool = False) -> None:
        config = DeepseekV3Config.from_arch(arch)
        super().__init__(arch, DeepseekV3Model(config, tp), tp.dense())
        self.config = config
        self.moe_tp = tp  # the MoE layers' group: under DP attention, wider than the rest's
        self.mtp: DeepseekMTPLayer | None = None
        if with_mtp:
            if config.num_nextn_predict_layers < 1:
                raise ModelLoadError("speculative='mtp' needs a checkpoint with a multi-token-prediction layer "
                                     "(config.json num_nextn_predict_layers >= 1); this one has none")
            block = DeepseekV3DecoderLayer(config, arch.num_layers, tp)
            self.mtp = DeepseekMTPLayer(block, arch.hidden_size, arch.rms_norm_eps)

    def kv_cache_spec(self) -> KVCacheSpec:
        # The MTP layer attends over its own cache: one more layer, after the others.
        return KVCacheSpec.latent(self.arch.num_layers + (self.mtp is not None), self.config.mla.latent_dim)

    def mtp_forward(self, input_ids, positions, previous_hidden, kv_cache, meta) -> torch.Tensor:
        """The MTP layer over (N,) tokens t[p+1] at positions p, with (N, hidden) hidden states
        H[p]; returns (N, hidden), for compute_logits (the shared head) and for chaining."""
        rope = self.model.rotary(positions, previous_hidden.dtype)
        return self.mtp(self.model.embed_tokens(input_ids), previous_hidden, positions, rope, kv_cache, meta)

    def idle_step(self) -> None:
        """A step with no tokens of this replica's own, under DP attention: every MoE layer
        still takes part in its group's collectives, with the other replicas' tokens."""
        empty = torch.zeros(0, self.arch.hidden_size, dtype=self.model.norm.weight.dtype,
                            device=self.model.norm.weight.device)
        for layer in self.model.layers:
            if isinstance(layer.mlp, DeepseekMoE):
                layer.mlp(empty)

    def active_parameters(self, total: int) -> int:
        return self.config.active_parameters(total)

    # ---- weights ------------------------------------------------------------------------------

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> set[str]:
        """Copy each (name, tensor) into its parameter; returns the names loaded."""
        params = dict(self.named_parameters())
        loaded, skipped = set(), 0
        for name, tensor in weights:
            if self._is_mtp(name) and (self.mtp is None or name.endswith(SHARED_WITH_MAIN)):
                skipped += 1
                continue
            if "rotary_emb" in name or (name == "lm_head.weight" and self.arch.tie_word_embeddings):
                continue
            target = self.weight_slice(name, params)
            if name in ("model.embed_tokens.weight", "lm_head.weight"):
                target = vocab_rows(target, tensor)
            if target.shape != tensor.shape:
                raise ModelLoadError(f"checkpoint tensor {name!r} has shape {tuple(tensor.shape)}, "
                                     f"the model expects {tuple(target.shape)}")
            with torch.no_grad():
                target.copy_(tensor)
            loaded.add(name)
        if self.mtp is not None and not any(self._is_mtp(n) for n in loaded):
            raise ModelLoadError(f"speculative='mtp': the checkpoint has no multi-token-prediction tensors "
                                 f"(model.layers.{self.arch.num_layers}.*) though config.json declares "
                                 f"num_nextn_predict_layers={self.config.num_nextn_predict_layers}")
        if skipped and self.mtp is None:
            log.info("skipped %d multi-token-prediction tensors (speculative='mtp' loads them)", skipped)
        for layer in self._layers():
            layer.self_attn.absorb_weights()
        return loaded

    def _layers(self) -> list[nn.Module]:
        return list(self.model.layers) + ([self.mtp.block] if self.mtp is not None else [])

    def _is_mtp(self, name: str) -> bool:
        m = re.match(r"model\.layers\.(\d+)\.", name)
        return m is not None and int(m.group(1)) >= self.arch.num_layers

    def param_name(self, checkpoint_name: str) -> str:
        """The parameter a checkpoint tensor is loaded into."""
        if self._is_mtp(checkpoint_name):
            suffix = checkpoint_name.split(".", 3)[3]  # after model.layers.{L}.
            checkpoint_name = "mtp." + DeepseekMTPLayer.param_name(suffix)
        m = _EXPERT.search(checkpoint_name)
        if m:
            stacked = "w2" if m.group(2) == "down_proj" else "w13"
            return checkpoint_name[:m.start()] + f".mlp.{stacked}"
        for part, (fused, _) in _FUSED.items():
            if f".{part}." in checkpoint_name:
                return checkpoint_name.replace(f".{part}.", f".{fused}.")
        return checkpoint_name

    def weight_slice(self, name: str, params: dict[str, torch.Tensor]) -> torch.Tensor:
        """The slice of a parameter a checkpoint tensor fills."""
        target = self.param_name(name)
        if target not in params:
            raise ModelLoadError(f"checkpoint tensor {name!r} has no place in {type(self).__name__}")
        param = params[target]
        m = _EXPERT.search(name)
        if m:
            first = self._moe(name).experts[0]  # this rank's first expert (expert parallelism)
            expert = param[int(m.group(1)) - first]  # (2I, hidden) or (hidden, I)
            return expert if m.group(2) == "down_proj" else expert.chunk(2, dim=0)[m.group(2) == "up_proj"]
        for part, (_, idx) in _FUSED.items():
            if f".{part}." in name:
                return param.chunk(2, dim=0)[idx]
        return param

    def checkpoint_slice(self, name: str) -> Selection:
        """What this rank reads of a checkpoint tensor: its heads of the query, kv_b_proj
        (rows) and o_proj (columns), its columns of the dense MLPs and of the experts (or
        its whole experts, under expert parallelism), its rows of the vocabulary; the
        multi-token-prediction layer not at all."""
        tp, c, a = self.tp, self.config.mla, self.arch
        if self._is_mtp(name) and (self.mtp is None or name.endswith(SHARED_WITH_MAIN)):
            return SKIP
        if name in ("model.embed_tokens.weight", "lm_head.weight"):
            return TensorSlice(0, *tp.padded_split(a.vocab_size))
        h0, h1 = tp.split(c.num_heads, "num_attention_heads")
        part = name.split(".")[-2] if name.startswith("model.layers.") else ""
        if part in ("q_proj", "q_b_proj"):
            return TensorSlice(0, h0 * c.qk_head_dim, h1 * c.qk_head_dim)
        if part == "kv_b_proj":
            return TensorSlice(0, h0 * (c.qk_nope_head_dim + c.v_head_dim), h1 * (c.qk_nope_head_dim + c.v_head_dim))
        if part == "o_proj":
            if name.endswith(".bias"):
                return None if tp.is_first else SKIP
            return TensorSlice(1, h0 * c.v_head_dim, h1 * c.v_head_dim)
        if part in ("gate_proj", "up_proj", "down_proj"):
            return self._mlp_slice(name, part)
        return None

    def _mlp_slice(self, name: str, part: str) -> Selection:
        tp, dim = self.tp, 1 if part == "down_proj" else 0  # self.tp: the dense layers' group
        m = _EXPERT.search(name)
        if ".mlp.shared_experts." in name or m:
            moe = self._moe(name)
            if moe.is_expert_parallel:  # whole experts, on their rank; shared ones on every rank
                return None if not m or moe.experts[0] <= int(m.group(1)) < moe.experts[1] else SKIP
            size = self.config.moe.moe_intermediate_size * (1 if m else self.config.moe.n_shared_experts)
        else:
            size = self.arch.intermediate_size
        return TensorSlice(dim, *tp.split(size, "intermediate_size"))

    def _moe(self, name: str) -> DeepseekMoE:
        return self._layers()[int(name.split(".")[2])].mlp

    def check_complete(self, loaded: set[str]) -> None:
        c = self.config
        expected = {"model.embed_tokens.weight", "model.norm.weight"}
        if not self.arch.tie_word_embeddings:
            expected.add("lm_head.weight")
        for i in range(len(self._layers())):
            p = f"model.layers.{i}"
            if i == self.arch.num_layers:
                expected |= {f"{p}.{w}.weight" for w in ("enorm", "hnorm", "eh_proj", "shared_head.norm")}
            expected |= {f"{p}.self_attn.kv_a_proj_with_mqa.weight", f"{p}.self_attn.kv_b_proj.weight",
                         f"{p}.self_attn.o_proj.weight"}
            if c.is_moe_layer(i):
                expected |= {f"{p}.mlp.gate.weight"}
                expected |= {f"{p}.mlp.experts.{e}.{w}.weight" for e in range(c.moe.n_routed_experts)
                             for w in ("gate_proj", "up_proj", "down_proj")}
        missing = sorted(n for n in expected - loaded if self.checkpoint_slice(n) != SKIP)  # SKIP: another rank's
        if missing:
            raise ModelLoadError(f"checkpoint is missing {len(missing)} tensors, e.g. {missing[:3]}")
