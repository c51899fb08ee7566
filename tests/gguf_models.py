"""Small Llama / Qwen2 GGUF files in any of ggml's block formats, written by the tests.

A byte-level tokenizer (the 256 bytes in GPT-2's spelling, then control tokens) and random
weights, each matrix encoded in the block type its role asks for (kquant_encoder.py for
the K-quants, gguf-py's quantizer for the rest): the shape of a llama-quantize preset
without llama.cpp.
"""
from __future__ import annotations

from pathlib import Path

import gguf
import numpy as np
from gguf import GGMLQuantizationType as Q

from kquant_encoder import quantize

# Tensor roles -> block type, as llama-quantize's presets choose them (Q4_K_M: v and down in
# Q6_K on some layers, the output in Q6_K).
MIXES = {
    "q4_k_m": {"token_embd": Q.Q4_K, "output": Q.Q6_K, "attn_q": Q.Q4_K, "attn_k": Q.Q4_K, "attn_v": Q.Q6_K,
               "attn_output": Q.Q4_K, "ffn_gate": Q.Q4_K, "ffn_up": Q.Q4_K, "ffn_down": Q.Q6_K},
    "legacy": {"token_embd": Q.Q8_0, "output": Q.Q5_1, "attn_q": Q.Q4_0, "attn_k": Q.Q4_1, "attn_v": Q.Q5_0,
               "attn_output": Q.Q8_0, "ffn_gate": Q.Q5_1, "ffn_up": Q.Q4_0, "ffn_down": Q.Q4_1},
    "low_bits": {"token_embd": Q.Q3_K, "output": Q.Q5_K, "attn_q": Q.Q2_K, "attn_k": Q.Q3_K, "attn_v": Q.Q5_K,
                 "attn_output": Q.Q2_K, "ffn_gate": Q.Q3_K, "ffn_up": Q.Q2_K, "ffn_down": Q.Q5_K},
    "f16": dict.fromkeys(("token_embd", "output", "attn_q", "attn_k", "attn_v", "attn_output", "ffn_gate",
                          "ffn_up", "ffn_down"), Q.F16),
}


def byte_tokens() -> list[str]:
    # GPT-2's bytes_to_unicode: printable bytes stand for themselves, the others shift past 255
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    spelling, extra = {}, 0
    for b in range(256):
        if b in printable:
            spelling[b] = chr(b)
        else:
            spelling[b] = chr(256 + extra)
            extra += 1
    return [spelling[b] for b in range(256)]


def write_model(path: Path, arch: str = "qwen2", mix: str = "q4_k_m", hidden: int = 256, ffn: int = 512,
                layers: int = 2, heads: int = 4, kv_heads: int = 2, vocab: int = 320, tied: bool = False,
                seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    types = MIXES[mix]
    head_dim = hidden // heads
    shapes = {"attn_q": (heads * head_dim, hidden), "attn_k": (kv_heads * head_dim, hidden),
              "attn_v": (kv_heads * head_dim, hidden), "attn_output": (hidden, heads * head_dim),
              "ffn_gate": (ffn, hidden), "ffn_up": (ffn, hidden), "ffn_down": (hidden, ffn)}
    writer = gguf.GGUFWriter(str(path), arch)
    writer.add_block_count(layers)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_layer_norm_rms_eps(1e-6)
    writer.add_rope_freq_base(10000.0)
    if arch == "llama":
        writer.add_rope_dimension_count(head_dim)
    tokens = byte_tokens() + [f"<|c{i}|>" for i in range(vocab - 256)]
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("smollm")
    writer.add_token_list(tokens)
    writer.add_token_merges([])
    writer.add_token_types([1] * 256 + [3] * (vocab - 256))
    writer.add_bos_token_id(256)
    writer.add_eos_token_id(257)

    def add(name: str, role: str, shape: tuple[int, int]) -> None:
        w = (rng.standard_normal(shape) * 0.05).astype(np.float32)
        kind = types[role]
        if kind == Q.F16:
            writer.add_tensor(name, w.astype(np.float16))
        else:
            writer.add_tensor(name, quantize(w, kind), raw_dtype=kind)

    def norm(name: str, size: int) -> None:
        writer.add_tensor(name, (1 + 0.1 * rng.standard_normal(size)).astype(np.float32))

    add("token_embd.weight", "token_embd", (vocab, hidden))
    norm("output_norm.weight", hidden)
    if not tied:
        add("output.weight", "output", (vocab, hidden))
    for i in range(layers):
        norm(f"blk.{i}.attn_norm.weight", hidden)
        norm(f"blk.{i}.ffn_norm.weight", hidden)
        for role, shape in shapes.items():
            add(f"blk.{i}.{role}.weight", role, shape)
        if arch == "qwen2":
            for role in ("attn_q", "attn_k", "attn_v"):
                writer.add_tensor(f"blk.{i}.{role}.bias", (0.1 * rng.standard_normal(shapes[role][0])).astype(np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path
