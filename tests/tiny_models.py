"""Tiny random checkpoints built with transformers, saved in HF format, for comparing
r1serve with the reference implementation."""
from __future__ import annotations

import json
from pathlib import Path

import torch

from r1serve.bench.random_checkpoint import CHAT_TEMPLATE, DEEPSEEK_V3_TINY, VOCAB, write_deepseek_v3, write_tokenizer  # noqa: F401


def make_checkpoint(path: Path, arch: str, shard_size: str | None = None, **overrides) -> Path:
    """Save a tiny random model of `arch` ("llama" or "qwen2") with a tokenizer into `path`
    (split into several safetensors files with an index when shard_size is given)."""
    import transformers

    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                  rms_norm_eps=1e-5, bos_token_id=None, eos_token_id=0)
    common.update(overrides)
    if arch == "llama":
        cfg = transformers.LlamaConfig(**common)
        cls = transformers.LlamaForCausalLM
    else:
        cfg = transformers.Qwen2Config(**common)
        cls = transformers.Qwen2ForCausalLM
    torch.manual_seed(0)
    model = cls(cfg).eval()
    with torch.no_grad():  # random init leaves biases at zero; make them matter
        for name, p in model.named_parameters():
            if name.endswith("bias"):
                p.normal_(0, 0.5)
    path.mkdir(parents=True, exist_ok=True)
    model.save_pretrained(path, safe_serialization=True, **({"max_shard_size": shard_size} if shard_size else {}))
    write_tokenizer(path)
    return path


def make_deepseek_v3(path: Path, *, q_lora_rank: int | None = 32, n_group: int = 2, topk_group: int = 1,
                     first_k_dense_replace: int = 1, yarn: bool = True, mtp: bool = True) -> Path:
    """A tiny DeepseekV3ForCausalLM with R1's tensor names (see r1serve.bench.random_checkpoint)."""
    sizes = dict(DEEPSEEK_V3_TINY, q_lora_rank=q_lora_rank, n_group=n_group, topk_group=topk_group,
                 first_k_dense_replace=first_k_dense_replace)
    return write_deepseek_v3(path, sizes, yarn=yarn, mtp=mtp)


def to_fp8_checkpoint(src: Path, dst: Path, block: tuple[int, int] = (32, 32)) -> Path:
    """R1's FP8 format: every linear weight of attention and MLPs as float8 e4m3 with per-block
    weight_scale_inv; embeddings, norms, the router and lm_head stay as they are."""
    import shutil

    from safetensors.torch import load_file, save_file

    from r1serve.kernels.fp8_block import quantize_fp8_block

    shutil.copytree(src, dst)
    weights = load_file(src / "model.safetensors")
    out = {}
    for name, w in weights.items():
        if name.endswith("_proj.weight") and ".layers." in name:
            out[name], out[name + "_scale_inv"] = quantize_fp8_block(w, block)
        else:
            out[name] = w
    save_file(out, dst / "model.safetensors", metadata={"format": "pt"})
    config = json.loads((src / "config.json").read_text())
    config["quantization_config"] = {"quant_method": "fp8", "fmt": "e4m3", "activation_scheme": "dynamic",
                                     "weight_block_size": list(block)}
    (dst / "config.json").write_text(json.dumps(config))
    return dst
