"""A model as the roofline sees it: parameter counts by how they are parallelised, and the
attention cost per token of context.

Totals (parameters, active parameters, KV bytes per token) come from r1serve's own model
code (models/planning.py builds the model on the meta device); the per-layer split comes
from the same configs the model classes read (MLAConfig / MoEConfig for DeepSeek-V3), and
a test checks that the parts add up to the total.
"""
from __future__ import annotations

import dataclasses
import hashlib
import json
import os
import tempfile
from dataclasses import dataclass
from importlib import resources
from pathlib import Path

from r1serve import __version__
from r1serve.errors import R1ServeError
from r1serve.models.arch_config import ArchConfig

BUILTIN_CONFIGS = {"deepseek-r1": "deepseek-r1.json", "deepseek-v3": "deepseek-r1.json"}


@dataclass(frozen=True)
class ModelShape:
    name: str
    parameters: int  # all of them, as r1serve builds the model
    active_parameters: int  # used by one token (embedding row included)
    kv_bytes_per_token: int  # BF16 cache, all layers
    checkpoint_format: str  # "fp8" or "bf16": how the checkpoint stores its linear weights
    num_layers: int
    moe_layers: int
    hidden: int
    vocab: int
    attn_params: int  # per layer: the projections (q/k/v/o, or MLA's q_a/q_b/kv_a/kv_b/o)
    dense_mlp_params: int  # per dense layer
    shared_params: int  # per MoE layer: shared experts and router, run on every token
    expert_params: int  # one routed expert
    n_experts: int  # routed experts per MoE layer (0: a dense model)
    top_k: int
    # Attention core, per query token, per layer, per context position:
    decode_flops_per_ctx: int  # decode form (MLA absorbed: scores and values over the latent)
    prefill_flops_per_ctx: int  # prefill form (MLA expanded: per-head K and V)
    kv_split_max: int  # how many ways TP can split the cache (KV heads; 1 for MLA's shared latent)
    proj_kernels: int  # attention projection GEMMs one layer launches
    vector_kernels: int  # norms, rope, cache writes, activations one layer launches (MoE routing aside)

    @property
    def dense_layers(self) -> int:
        return self.num_layers - self.moe_layers

    @property
    def embed_params(self) -> int:
        return self.vocab * self.hidden

    def parts_total(self) -> int:
        """The parameters the parts add up to (norms left out: they are 0.001% of R1)."""
        return (self.num_layers * self.attn_params + self.dense_layers * self.dense_mlp_params
                + self.moe_layers * (self.shared_params + self.n_experts * self.expert_params)
                + 2 * self.embed_params)


def read_config(model: str) -> tuple[str, dict]:
    """A model's config.json: a built-in name (deepseek-r1), a config.json path or an HF directory."""
    if model.lower() in BUILTIN_CONFIGS:
        text = resources.files("r1serve.planner").joinpath("model_configs", BUILTIN_CONFIGS[model.lower()]).read_text()
        return model.lower(), json.loads(text)
    path = Path(model).expanduser()
    path = path / "config.json" if path.is_dir() else path
    if not path.is_file():
        raise R1ServeError(f"model {model!r} is neither a built-in config ({', '.join(BUILTIN_CONFIGS)}) "
                           "nor a config.json file or a directory holding one")
    try:
        return path.parent.name if path.name == "config.json" else path.stem, json.loads(path.read_text())
    except json.JSONDecodeError as e:
        raise R1ServeError(f"{path} is not valid JSON: {e}") from None


def model_shape(model: str, cache_dir: Path | None = None) -> ModelShape:
    """The model's shape; kept in `cache_dir` once computed, so that an answer of the planner
    does not wait for torch to import and a model to be built on the meta device (seconds)."""
    name, cfg = read_config(model)
    if cache_dir is None:
        return shape_from_config(name, cfg)
    path = Path(cache_dir) / "planner" / "shapes.json"
    key = hashlib.sha256(json.dumps([__version__, name, cfg], sort_keys=True).encode()).hexdigest()[:24]
    known = _read_json(path)
    if key in known:
        return ModelShape(**known[key])
    shape = shape_from_config(name, cfg)
    _write_json(path, {**_read_json(path), key: dataclasses.asdict(shape)})
    return shape


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}


def _write_json(path: Path, data: dict) -> None:
    try:  # whole or not at all: a second process may be writing too
        path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".shapes-")
        with os.fdopen(fd, "w") as f:
            json.dump(data, f)
        os.replace(tmp, path)
    except OSError:
        pass  # a read-only cache: computed again next time


def shape_from_config(name: str, cfg: dict) -> ModelShape:
    import torch  # here, not at import: a cached shape needs neither torch nor the model code

    from r1serve.models.planning import numbers_from_config

    arch = ArchConfig.from_hf(cfg)
    numbers = numbers_from_config(cfg, torch.bfloat16, 1)
    fmt = "fp8" if (cfg.get("quantization_config") or {}).get("quant_method") == "fp8" else "bf16"
    common = dict(name=name, parameters=numbers.parameters, active_parameters=numbers.active_parameters,
                  kv_bytes_per_token=numbers.kv_bytes_per_token, checkpoint_format=fmt,
                  num_layers=arch.num_layers, hidden=arch.hidden_size, vocab=arch.vocab_size)
    if arch.architecture == "DeepseekV3ForCausalLM":
        return ModelShape(**common, **_deepseek_v3_parts(arch))
    return ModelShape(**common, **_dense_parts(arch))


def _deepseek_v3_parts(arch: ArchConfig) -> dict:
    from r1serve.models.deepseek_v3 import DeepseekV3Config

    c = DeepseekV3Config.from_arch(arch)
    mla, moe, H, h = c.mla, c.moe, c.mla.num_heads, arch.hidden_size
    q = h * H * mla.qk_head_dim if mla.q_lora_rank is None else \
        h * mla.q_lora_rank + mla.q_lora_rank * H * mla.qk_head_dim
    attn = q + h * mla.latent_dim + mla.kv_lora_rank * H * (mla.qk_nope_head_dim + mla.v_head_dim) \
        + H * mla.v_head_dim * h
    expert = 3 * h * moe.moe_intermediate_size
    moe_layers = sum(c.is_moe_layer(i) for i in range(arch.num_layers))
    return dict(moe_layers=moe_layers, attn_params=attn, dense_mlp_params=3 * h * arch.intermediate_size,
                shared_params=moe.n_shared_experts * expert + h * moe.n_routed_experts,
                expert_params=expert, n_experts=moe.n_routed_experts, top_k=moe.num_experts_per_tok,
                # absorbed: q.c_kv and q_pe.k_pe scores over latent_dim, then p.c_kv over kv_lora_rank
                decode_flops_per_ctx=2 * H * (mla.latent_dim + mla.kv_lora_rank),
                prefill_flops_per_ctx=2 * H * (mla.qk_head_dim + mla.v_head_dim),
                kv_split_max=1,
                proj_kernels=6,  # q_a, q_b, kv_a, q_nope absorb (W_UK), output absorb (W_UV), o
                vector_kernels=6)  # 2 layer norms, q_a and kv_a norms, rope, latent cache write


def _dense_parts(arch: ArchConfig) -> dict:
    h, d = arch.hidden_size, arch.head_dim
    attn = h * arch.num_heads * d + 2 * h * arch.num_kv_heads * d + arch.num_heads * d * h
    scores = 2 * arch.num_heads * d * 2  # q.k and p.v
    return dict(moe_layers=0, attn_params=attn, dense_mlp_params=3 * h * arch.intermediate_size,
                shared_params=0, expert_params=0, n_experts=0, top_k=0,
                decode_flops_per_ctx=scores, prefill_flops_per_ctx=scores, kv_split_max=arch.num_kv_heads,
                proj_kernels=2,  # fused qkv, o
                vector_kernels=4)  # 2 norms, rope + cache write, SiLU-and-mul
