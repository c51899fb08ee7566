"""GGUFCheckpoint against transformers' GGUF loader, and each dequantizer against the ggml spec."""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q

from r1serve.errors import ModelLoadError
from r1serve.models import gguf_checkpoint
from r1serve.models.gguf_checkpoint import GGUFCheckpoint

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate", reason="transformers needs accelerate to load GGUF weights")


# ---- helpers ----------------------------------------------------------------------------------


def write_gguf(path: Path, arch: str, tensors: dict[str, tuple[np.ndarray, Q | None]], **meta) -> Path:
    """A GGUF with `arch`-prefixed metadata (add_<name>(value) calls) and the given tensors."""
    writer = gguf.GGUFWriter(str(path), arch)
    for name, value in meta.items():
        getattr(writer, f"add_{name}")(value)
    for name, (array, raw_dtype) in tensors.items():
        writer.add_tensor(name, array, raw_dtype=raw_dtype)
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    return path


TINY = dict(hidden=64, heads=4, kv_heads=2, ffn=128, layers=2, vocab=100)


def tiny_qwen2_tensors(rng: np.random.Generator) -> dict[str, tuple[np.ndarray, Q | None]]:
    h, f, v = TINY["hidden"], TINY["ffn"], TINY["vocab"]
    kv = h // TINY["heads"] * TINY["kv_heads"]
    f32 = lambda *shape: (rng.standard_normal(shape).astype(np.float32), None)  # noqa: E731
    f16 = lambda *shape: (rng.standard_normal(shape).astype(np.float16), None)  # noqa: E731
    bf16 = lambda *shape: (gguf.quants.quantize(rng.standard_normal(shape).astype(np.float32), Q.BF16), Q.BF16)  # noqa: E731
    tensors = {"token_embd.weight": f32(v, h), "output_norm.weight": f32(h), "output.weight": f16(v, h)}
    for i in range(TINY["layers"]):
        tensors |= {
            f"blk.{i}.attn_norm.weight": f32(h),
            f"blk.{i}.ffn_norm.weight": f32(h),
            f"blk.{i}.attn_q.weight": f16(h, h),
            f"blk.{i}.attn_q.bias": f32(h),
            f"blk.{i}.attn_k.weight": bf16(kv, h),
            f"blk.{i}.attn_k.bias": f32(kv),
            f"blk.{i}.attn_v.weight": f32(kv, h),
            f"blk.{i}.attn_v.bias": f32(kv),
            f"blk.{i}.attn_output.weight": f16(h, h),
            f"blk.{i}.ffn_gate.weight": f32(f, h),
            f"blk.{i}.ffn_up.weight": bf16(f, h),
            f"blk.{i}.ffn_down.weight": f16(h, f),
        }
    return tensors


def tiny_qwen2_meta() -> dict:
    return dict(
        block_count=TINY["layers"], context_length=256, embedding_length=TINY["hidden"],
        feed_forward_length=TINY["ffn"], head_count=TINY["heads"], head_count_kv=TINY["kv_heads"],
        layer_norm_rms_eps=1e-6, rope_freq_base=1e6, vocab_size=TINY["vocab"], bos_token_id=5, eos_token_id=7,
    )


def transformers_load(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32)


def assert_state_dict_equal(checkpoint: GGUFCheckpoint, model) -> None:
    ours = dict(checkpoint.iter_weights())
    theirs = model.state_dict()
    if model.config.tie_word_embeddings:
        theirs = {k: v for k, v in theirs.items() if k != "lm_head.weight"}
    assert set(ours) == set(theirs)
    for name, tensor in ours.items():
        assert tensor.dtype == torch.float32, name
        assert torch.equal(tensor, theirs[name]), name


# ---- the real SmolLM2 file against transformers ------------------------------------------------

CONFIG_FIELDS = [
    "model_type", "hidden_size", "intermediate_size", "num_hidden_layers", "num_attention_heads",
    "num_key_value_heads", "rms_norm_eps", "max_position_embeddings", "vocab_size",
    "tie_word_embeddings", "bos_token_id", "eos_token_id", "pad_token_id", "hidden_act",
]


@pytest.fixture(scope="module")
def smollm2(smollm2_gguf):
    return GGUFCheckpoint.open(smollm2_gguf), transformers_load(smollm2_gguf)


def test_smollm2_weights_equal_transformers(smollm2):
    checkpoint, model = smollm2
    # Q and K are only equal if the rotary permutation of llama.cpp's converter is undone exactly.
    assert_state_dict_equal(checkpoint, model)


def test_smollm2_config_equals_transformers(smollm2):
    checkpoint, model = smollm2
    ours, theirs = checkpoint.hf_config, model.config.to_dict()
    for field in CONFIG_FIELDS + ["head_dim", "attention_bias", "mlp_bias"]:
        assert ours[field] == theirs[field], field
    assert ours["rope_theta"] == theirs["rope_parameters"]["rope_theta"] == 100000.0
    assert ours["architectures"] == ["LlamaForCausalLM"]
    assert ours["torch_dtype"] == "float32" and model.dtype == torch.float32
    assert ours["tie_word_embeddings"] is True  # the file has no output.weight
    rebuilt = transformers.LlamaConfig(**ours).to_dict()
    for field in CONFIG_FIELDS + ["head_dim", "rope_parameters"]:
        assert rebuilt[field] == theirs[field], field


def test_smollm2_tokenizer_comes_from_the_file(smollm2):
    tokenizer = smollm2[0].tokenizer()
    assert tokenizer.eos_token == "<|im_end|>" and tokenizer.vocab_size == 49152


# ---- a tiny Qwen2 file: biases, untied head, F16/BF16, no rotary permutation --------------------


@pytest.fixture(scope="module")
def tiny_qwen2(tmp_path_factory):
    path = tmp_path_factory.mktemp("qwen2") / "tiny-qwen2.gguf"
    write_gguf(path, "qwen2", tiny_qwen2_tensors(np.random.default_rng(0)), **tiny_qwen2_meta())
    return path


def test_tiny_qwen2_weights_and_config_equal_transformers(tiny_qwen2):
    checkpoint, model = GGUFCheckpoint.open(tiny_qwen2), transformers_load(tiny_qwen2)
    assert_state_dict_equal(checkpoint, model)
    ours, theirs = checkpoint.hf_config, model.config.to_dict()
    for field in CONFIG_FIELDS:
        assert ours[field] == theirs[field], field
    assert ours["rope_theta"] == theirs["rope_parameters"]["rope_theta"] == 1e6
    assert ours["architectures"] == ["Qwen2ForCausalLM"]
    assert ours["tie_word_embeddings"] is False
    assert "model.layers.0.self_attn.q_proj.bias" in dict(checkpoint.iter_weights())
    assert ours["head_dim"] == TINY["hidden"] // TINY["heads"]
    assert ours["torch_dtype"] == "float32"  # mixed F32/F16/BF16 matrices


def test_iter_weights_dequantizes_one_tensor_at_a_time(tiny_qwen2, monkeypatch):
    calls = []
    real = gguf_checkpoint._dequantize
    monkeypatch.setattr(gguf_checkpoint, "_dequantize", lambda data, kind: calls.append(kind) or real(data, kind))
    weights = GGUFCheckpoint.open(tiny_qwen2).iter_weights()
    next(weights)
    assert len(calls) == 1
    next(weights)
    assert len(calls) == 2


# ---- dequantization against the ggml block layouts --------------------------------------------


def _f16(raw) -> float:
    return float(np.frombuffer(bytes(raw), dtype=np.float16)[0])


def ref_q8_0(b):
    return _f16(b[0:2]) * np.frombuffer(bytes(b[2:34]), dtype=np.int8).astype(np.float64)


def ref_q4_0(b):
    qs = b[2:18].astype(np.int64)
    return _f16(b[0:2]) * (np.concatenate([qs & 0xF, qs >> 4]) - 8)


def ref_q4_1(b):
    qs = b[4:20].astype(np.int64)
    return _f16(b[0:2]) * np.concatenate([qs & 0xF, qs >> 4]) + _f16(b[2:4])


def _q5_values(qh_raw, qs) -> list[int]:
    qh = int.from_bytes(bytes(qh_raw), "little")
    low = [(int(q) & 0xF) | (((qh >> j) & 1) << 4) for j, q in enumerate(qs)]
    high = [(int(q) >> 4) | (((qh >> (j + 16)) & 1) << 4) for j, q in enumerate(qs)]
    return low + high


def ref_q5_0(b):
    return _f16(b[0:2]) * (np.array(_q5_values(b[2:6], b[6:22])) - 16)


def ref_q5_1(b):
    return _f16(b[0:2]) * np.array(_q5_values(b[4:8], b[8:24])) + _f16(b[2:4])


def ref_q2_k(b):
    scales, qs, d, dmin = b[0:16], b[16:80], _f16(b[80:82]), _f16(b[82:84])
    out, k = [], 0
    for half in range(2):  # 128 values from each 32 bytes of qs, 2 bits at a time
        q = qs[32 * half: 32 * half + 32]
        for shift in (0, 2, 4, 6):
            for part in range(2):
                sc = int(scales[k])
                k += 1
                values = q[16 * part: 16 * part + 16]
                out += [d * (sc & 0xF) * ((int(x) >> shift) & 3) - dmin * (sc >> 4) for x in values]
    return np.array(out)


def _q3_k_scales(raw) -> list[int]:
    a0, a1, tmp = (int.from_bytes(bytes(raw[i: i + 4]), "little") for i in (0, 4, 8))
    low, two = 0x0F0F0F0F, 0x03030303
    words = [
        (a0 & low) | (((tmp >> 0) & two) << 4), (a1 & low) | (((tmp >> 2) & two) << 4),
        ((a0 >> 4) & low) | (((tmp >> 4) & two) << 4), ((a1 >> 4) & low) | (((tmp >> 6) & two) << 4),
    ]
    return [(w >> (8 * i)) & 0xFF for w in words for i in range(4)]  # 16 six-bit scales


def ref_q3_k(b):
    hmask, qs, scales, d = b[0:32], b[32:96], _q3_k_scales(b[96:108]), _f16(b[108:110])
    out, k, bit = [], 0, 1
    for half in range(2):
        q = qs[32 * half: 32 * half + 32]
        for shift in (0, 2, 4, 6):
            for part in range(2):
                dl = d * (scales[k] - 32)
                k += 1
                for i in range(16 * part, 16 * part + 16):
                    out.append(dl * (((int(q[i]) >> shift) & 3) - (0 if hmask[i] & bit else 4)))
            bit <<= 1
    return np.array(out)


def _k4_scale_min(j: int, q) -> tuple[int, int]:
    q = [int(x) for x in q]
    if j < 4:
        return q[j] & 63, q[j + 4] & 63
    return (q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4), (q[j + 4] >> 4) | ((q[j] >> 6) << 4)


def ref_q4_k(b):
    d, dmin, scales, qs = _f16(b[0:2]), _f16(b[2:4]), b[4:16], b[16:144]
    out = []
    for g in range(4):  # 64 values from each 32 bytes: low nibbles, then high nibbles
        (s1, m1), (s2, m2) = _k4_scale_min(2 * g, scales), _k4_scale_min(2 * g + 1, scales)
        q = [int(x) for x in qs[32 * g: 32 * g + 32]]
        out += [d * s1 * (x & 0xF) - dmin * m1 for x in q] + [d * s2 * (x >> 4) - dmin * m2 for x in q]
    return np.array(out)


def ref_q5_k(b):
    d, dmin, scales, qh, qs = _f16(b[0:2]), _f16(b[2:4]), b[4:16], b[16:48], b[48:176]
    out, u1, u2 = [], 1, 2
    for g in range(4):
        (s1, m1), (s2, m2) = _k4_scale_min(2 * g, scales), _k4_scale_min(2 * g + 1, scales)
        q = [int(x) for x in qs[32 * g: 32 * g + 32]]
        out += [d * s1 * ((x & 0xF) + (16 if qh[i] & u1 else 0)) - dmin * m1 for i, x in enumerate(q)]
        out += [d * s2 * ((x >> 4) + (16 if qh[i] & u2 else 0)) - dmin * m2 for i, x in enumerate(q)]
        u1, u2 = u1 << 2, u2 << 2
    return np.array(out)


def ref_q6_k(b):
    ql, qh, scales, d = b[0:128], b[128:192], np.frombuffer(bytes(b[192:208]), np.int8), _f16(b[208:210])
    out = np.zeros(256)
    for n in range(2):
        lo, hi, sc = ql[64 * n:], qh[32 * n:], scales[8 * n:]
        for i in range(32):
            s = i // 16
            q1 = ((int(lo[i]) & 0xF) | (((int(hi[i]) >> 0) & 3) << 4)) - 32
            q2 = ((int(lo[i + 32]) & 0xF) | (((int(hi[i]) >> 2) & 3) << 4)) - 32
            q3 = ((int(lo[i]) >> 4) | (((int(hi[i]) >> 4) & 3) << 4)) - 32
            q4 = ((int(lo[i + 32]) >> 4) | (((int(hi[i]) >> 6) & 3) << 4)) - 32
            for offset, s_off, q in ((0, 0, q1), (32, 2, q2), (64, 4, q3), (96, 6, q4)):
                out[128 * n + i + offset] = d * sc[s + s_off] * q
    return out


# type -> (reference decoder of one block, byte offsets of the block's float16 scale fields)
BLOCK_TYPES = {
    Q.Q8_0: (ref_q8_0, [0]), Q.Q4_0: (ref_q4_0, [0]), Q.Q4_1: (ref_q4_1, [0, 2]),
    Q.Q5_0: (ref_q5_0, [0]), Q.Q5_1: (ref_q5_1, [0, 2]), Q.Q2_K: (ref_q2_k, [80, 82]),
    Q.Q3_K: (ref_q3_k, [108]), Q.Q4_K: (ref_q4_k, [0, 2]), Q.Q5_K: (ref_q5_k, [0, 2]), Q.Q6_K: (ref_q6_k, [208]),
}
ROWS, COLS = 2, 512


def random_blocks(kind: Q, rng: np.random.Generator) -> np.ndarray:
    """(ROWS, bytes per row) of random blocks whose float16 scales are sane (random bits give inf/nan)."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[kind]
    blocks = rng.integers(0, 256, size=(ROWS * COLS // block_size, type_size), dtype=np.uint8)
    for offset in BLOCK_TYPES[kind][1]:
        scales = rng.uniform(0.01, 1.0, size=len(blocks)).astype(np.float16)
        blocks[:, offset: offset + 2] = scales.view(np.uint8).reshape(-1, 2)
    return blocks.reshape(ROWS, -1)


@pytest.fixture(scope="module")
def every_type(tmp_path_factory):
    """One GGUF holding a (ROWS, COLS) tensor of each supported type, and the float64 expectation."""
    rng = np.random.default_rng(1)
    tensors, expected = {}, {}
    for i, kind in enumerate(BLOCK_TYPES):
        raw = random_blocks(kind, rng)
        block_bytes = gguf.GGML_QUANT_SIZES[kind][1]
        decode = BLOCK_TYPES[kind][0]
        tensors[f"blk.{i}.ffn_up.weight"] = (raw, kind)
        expected[kind] = np.stack([np.concatenate([decode(b) for b in row.reshape(-1, block_bytes)]) for row in raw])
    floats = rng.standard_normal((ROWS, COLS)).astype(np.float32)
    bf16_bits = (floats.view(np.uint32) >> 16).astype(np.uint16)
    for kind, array, raw_dtype, value in [
        (Q.F32, floats, None, floats),
        (Q.F16, floats.astype(np.float16), None, floats.astype(np.float16)),
        (Q.BF16, bf16_bits.view(np.uint8).reshape(ROWS, -1), Q.BF16,
         (bf16_bits.astype(np.uint32) << 16).view(np.float32)),
    ]:
        tensors[f"blk.{len(tensors)}.ffn_up.weight"] = (array, raw_dtype)
        expected[kind] = value.astype(np.float64)
    path = write_gguf(tmp_path_factory.mktemp("types") / "types.gguf", "llama", tensors)
    names = {kind: name for kind, name in zip(expected, tensors)}
    return GGUFCheckpoint.open(path), names, expected


@pytest.mark.parametrize("kind", list(BLOCK_TYPES) + [Q.F32, Q.F16, Q.BF16], ids=lambda k: k.name)
def test_dequantize_matches_block_layout(every_type, kind):
    checkpoint, names, expected = every_type
    got = checkpoint.read_tensor(names[kind])
    assert got.dtype == torch.float32 and got.shape == (ROWS, COLS)
    np.testing.assert_allclose(got.numpy(), expected[kind], rtol=1e-5, atol=1e-6)


def test_q4_k_known_block():
    # d=1, dmin=0.5, every sub-block scale 1 and min 2, every byte 0x53 (low nibble 3, high 5):
    # each 64-value group is 32 x (1*3 - 0.5*2) then 32 x (1*5 - 0.5*2).
    block = np.zeros(144, dtype=np.uint8)
    block[0:2] = np.array([1.0], np.float16).view(np.uint8)
    block[2:4] = np.array([0.5], np.float16).view(np.uint8)
    block[4:8], block[8:12], block[12:16] = 1, 2, 0x21
    block[16:] = 0x53
    expected = np.tile(np.repeat([2.0, 4.0], 32), 4)
    np.testing.assert_array_equal(ref_q4_k(block), expected)
    np.testing.assert_array_equal(gguf_checkpoint._dequantize(block.reshape(1, -1), Q.Q4_K)[0], expected)


# Largest error a correct round trip can have, per block: one quantization step (the symmetric
# types clip one end of the range by a whole step). A wrong block layout scrambles values by
# about the block's whole range, far beyond this.
ROUND_TRIP_STEP = {
    Q.Q8_0: lambda x: np.abs(x).max() / 127, Q.Q4_0: lambda x: np.abs(x).max() / 8,
    Q.Q4_1: lambda x: (x.max() - x.min()) / 15, Q.Q5_0: lambda x: np.abs(x).max() / 16,
    Q.Q5_1: lambda x: (x.max() - x.min()) / 31, Q.BF16: lambda x: np.abs(x).max() / 128,
}


@pytest.mark.parametrize("kind", list(ROUND_TRIP_STEP), ids=lambda k: k.name)
def test_quantize_round_trip_within_one_step(tmp_path, kind):
    x = np.random.default_rng(2).standard_normal((4, 256)).astype(np.float32)
    path = write_gguf(tmp_path / "rt.gguf", "llama", {"blk.0.ffn_up.weight": (gguf.quants.quantize(x, kind), kind)})
    got = GGUFCheckpoint.open(path).read_tensor("blk.0.ffn_up.weight").numpy()
    block = gguf.GGML_QUANT_SIZES[kind][0]
    for xb, gb in zip(x.reshape(-1, block), got.reshape(-1, block)):
        step = ROUND_TRIP_STEP[kind](xb)
        assert np.abs(xb - gb).max() <= 1.01 * step


# ---- files r1serve must refuse -----------------------------------------------------------------


def test_missing_file(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        GGUFCheckpoint.open(tmp_path / "nope.gguf")


def test_random_bytes(tmp_path):
    path = tmp_path / "random.gguf"
    path.write_bytes(os.urandom(4096))
    with pytest.raises(ModelLoadError, match="not a readable GGUF"):
        GGUFCheckpoint.open(path)


def test_header_reader_reads_what_gguf_py_reads(smollm2_gguf, tiny_qwen2, every_type):
    """r1serve's one-pass header reader (models/gguf_file.py) against gguf-py's GGUFReader:
    every metadata value, and every tensor's name, type, shape, offset, size and data."""
    from r1serve.models.gguf_file import GGUFFile

    for path in (smollm2_gguf, tiny_qwen2, every_type[0].path):
        ours, theirs = GGUFFile(path), gguf.GGUFReader(path)
        fields = {k: f.contents() for k, f in theirs.fields.items() if not k.startswith("GGUF.")}
        assert ours.metadata == fields, path
        assert len(ours.tensors) == len(theirs.tensors)
        for a, b in zip(ours.tensors, theirs.tensors):
            assert (a.name, a.tensor_type, a.shape, a.data_offset, a.n_bytes) == \
                (b.name, b.tensor_type, tuple(int(d) for d in b.shape), b.data_offset, b.n_bytes)
            assert a.data.dtype == b.data.dtype and a.data.shape == b.data.shape and np.array_equal(a.data, b.data)


@pytest.mark.parametrize("keep", [0.05, 0.5, 0.98])
def test_truncated_file(tiny_qwen2, tmp_path, keep):
    data = tiny_qwen2.read_bytes()
    path = tmp_path / "truncated.gguf"
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelLoadError, match="truncated"):
        GGUFCheckpoint.open(path)


def test_unsupported_architecture(tmp_path):
    path = write_gguf(tmp_path / "gpt2.gguf", "gpt2", {"token_embd.weight": (np.zeros((4, 8), np.float32), None)})
    with pytest.raises(ModelLoadError, match=r"'gpt2'.*supported: \['llama', 'qwen2'\]"):
        GGUFCheckpoint.open(path)


def test_unsupported_tensor_type_names_tensor_type_and_list(tmp_path):
    raw = np.zeros((2, 2 * gguf.GGML_QUANT_SIZES[Q.IQ4_NL][1]), np.uint8)  # 2 rows of 64 values
    path = write_gguf(tmp_path / "iq.gguf", "llama", {"blk.0.ffn_up.weight": (raw, Q.IQ4_NL)})
    with pytest.raises(ModelLoadError, match=r"'blk.0.ffn_up.weight'.*IQ4_NL.*Q4_K"):
        GGUFCheckpoint.open(path)


def test_unknown_tensor_name(tmp_path):
    tensors = {"blk.0.ffn_gate_exps.weight": (np.zeros((2, 32), np.float32), None)}
    path = write_gguf(tmp_path / "odd.gguf", "llama", tensors)
    with pytest.raises(ModelLoadError, match="ffn_gate_exps"):
        GGUFCheckpoint.open(path)


def test_missing_metadata_named_in_error(every_type):
    with pytest.raises(ModelLoadError, match="llama.embedding_length"):
        _ = every_type[0].hf_config
