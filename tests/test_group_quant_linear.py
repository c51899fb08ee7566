"""The int4/int8 group-quantized GEMM against its twin, the weights it stands for, and the
loader's choice of which linears get which form."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

from r1serve.config import EngineConfig
from r1serve.errors import InvalidRequestError
from r1serve.kernels.group_quant_linear import (
    dequantize_groups,
    group_quant_kernel_available,
    group_quant_linear,
    group_quant_linear_reference,
    quantize_activations,
    quantize_groups,
    to_group_quant,
    unpack_groups,
)
from r1serve.kernels.onednn_linear import packing_available
from r1serve.platforms.cpu.linear import CpuLinear

needs_kernel = pytest.mark.skipif(not group_quant_kernel_available(), reason="no C++ compiler: the CPU kernels are not built")
SHAPES = [(37, 80), (5, 7), (16, 32), (96, 576), (33, 1000)]  # odd N and K: padded rows and columns


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("N,K", SHAPES)
def test_pack_round_trips_and_error_is_half_a_step(bits, N, K):
    torch.manual_seed(0)
    w = torch.randn(N, K).bfloat16()
    codes, scale, mn = quantize_groups(w, bits)
    gw = to_group_quant(w, bits)
    got = unpack_groups(gw)
    assert all(torch.equal(a, b) for a, b in zip(got, (codes, scale, mn)))
    assert torch.equal(to_group_quant(w, bits, chunk_rows=16).packed, gw.packed)  # packed a chunk of rows at a time
    assert codes.max() <= (15 if bits == 4 else 255)
    # Each weight is within half a step of its group's grid (plus the fp16 rounding of min).
    step = scale.float().repeat_interleave(32, dim=1)[:, :K]
    err = (dequantize_groups(gw) - w.float()).abs()
    assert (err <= step * 0.5 + 2e-3 * w.float().abs() + 1e-6).all()


def gguf_weights(kind: Q, N: int, K: int) -> torch.Tensor:
    # (N, K) as a GGUF file of `kind` stores them, dequantized to float32 as the loader does
    x = np.random.default_rng(1).standard_normal((N, K)).astype(np.float32) * 0.05
    return torch.from_numpy(gguf.quants.dequantize(gguf.quants.quantize(x, kind), kind).astype(np.float32))


@pytest.mark.parametrize("kind,bits", [(Q.Q4_1, 4), (Q.Q8_0, 8)])
def test_gguf_blocks_are_reproduced_to_bf16_rounding(kind, bits):
    """A Q4_1 (Q8_0) checkpoint's weights fall on the int4 (int8) grid: requantized from
    their bf16 copy they come back within two bf16 roundings of the group's largest weight
    (the bf16 copy itself is one away), far inside the half step of arbitrary weights."""
    exact = gguf_weights(kind, 64, 256)
    w = exact.bfloat16()
    err = (dequantize_groups(to_group_quant(w, bits)) - exact).abs().view(64, 8, 32)
    group_max = exact.abs().view(64, 8, 32).amax(-1, keepdim=True)
    assert (err <= group_max * 2 ** -7).all(), (err / group_max).max()
    if bits == 4:  # Q4_1's own codes come back: min maps to 0, max to 15, each group spans them
        _, scale, _ = quantize_groups(w, bits)
        assert (err <= 0.1 * scale.float().view(64, 8, 1)).all()
        lo, hi = exact.view(64, 8, 32).aminmax(dim=-1)
        file_codes = ((exact.view(64, 8, 32) - lo[..., None]) / ((hi - lo) / 15)[..., None]).round()
        assert torch.equal(quantize_groups(w, 4)[0].view(64, 8, 32).float(), file_codes)


@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("N,K", SHAPES)
def test_rows_dequantize_as_the_whole_weight(bits, N, K):
    from r1serve.kernels.group_quant_linear import dequantize_rows

    torch.manual_seed(0)
    gw = to_group_quant(torch.randn(N, K), bits)
    ids = torch.randint(0, N, (19,))
    assert torch.equal(dequantize_rows(gw, ids), dequantize_groups(gw)[ids])


def test_embedding_looks_rows_up_in_groups():
    from r1serve.layers.embedding import VocabEmbedding

    torch.manual_seed(0)
    embed = VocabEmbedding(50, 40)
    embed.weight.data.normal_()
    gw = to_group_quant(embed.weight.detach(), 8)
    ids = torch.tensor([[3, 49, 0], [7, 7, 12]])
    embed.look_up_in(gw)
    assert embed.weight is None
    assert torch.equal(embed(ids), dequantize_groups(gw)[ids])


def test_activation_quantization_is_q8_1():
    x = torch.tensor([[0.0] * 32 + [1.0, -2.0, 0.5] + [0.0] * 29]).bfloat16()
    a, dx, sx = quantize_activations(x)
    assert dx[0, 0] == 0 and (a[0, 0] == 0).all()  # an all-zero group
    assert a[0, 1, :3].tolist() == [64.0, -127.0, 32.0] and dx[0, 1] == pytest.approx(2 / 127)  # 63.5 -> 64 (even)
    assert sx[0, 1] == pytest.approx(dx[0, 1] * (64 - 127 + 32))


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("N,K", SHAPES)
@pytest.mark.parametrize("rows", [1, 2, 3, 4, 5, 9, 19])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_matches_twin(bits, N, K, rows, dtype, isa_kernels):
    """Kernel and twin do the same integer dot products and differ only in the order of the
    float sums: bf16 outputs agree to one rounding step (2^-8 relative), float32 ones to
    float32 sums' rounding."""
    torch.manual_seed(rows)
    gw = to_group_quant(torch.randn(N, K).bfloat16(), bits)
    x, bias = torch.randn(rows, K).to(dtype), torch.randn(N).to(dtype)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-5
    for b in (None, bias):
        got = group_quant_linear(x, gw, b, isa_kernels)
        expected = group_quant_linear_reference(x, gw, b)
        assert got.shape == (rows, N) and got.dtype == dtype
        torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol * expected.abs().max().item())


@pytest.mark.parametrize("bits", [4, 8])
def test_twin_error_is_the_activation_rounding(bits):
    """Against a float matmul with the same weights, the only error is rounding x to int8
    per group: |y - y_float| <= |W| @ (dx / 2), plus the bf16 rounding of y."""
    torch.manual_seed(0)
    N, K = 40, 200
    gw = to_group_quant(torch.randn(N, K).bfloat16(), bits)
    x = (torch.randn(3, K) * torch.rand(3, K) * 4).bfloat16()
    w = dequantize_groups(gw)
    exact = x.float() @ w.T
    _, dx, _ = quantize_activations(x)
    half_step = (dx / 2).repeat_interleave(32, dim=1)[:, :K]  # (3, K)
    bound = half_step @ w.abs().T + exact.abs() * 2 ** -8 + 1e-4
    assert ((group_quant_linear_reference(x, gw, None).float() - exact).abs() <= bound).all()


def test_bad_inputs_are_refused():
    w = to_group_quant(torch.randn(20, 64).bfloat16(), 4)
    with pytest.raises(AssertionError):
        group_quant_linear(torch.randn(1, 63).bfloat16(), w, None)  # wrong K
    with pytest.raises(AssertionError):
        group_quant_linear(torch.randn(1, 64).half(), w, None)  # float16 activations
    with pytest.raises(AssertionError):
        to_group_quant(torch.randn(4, 32), 5)


@needs_kernel
@pytest.mark.skipif(not packing_available(), reason="oneDNN bf16 GEMM not available on this CPU")
def test_cpu_linear_uses_groups_for_few_rows_only():
    torch.manual_seed(0)
    dense = nn.Linear(64, 48, bias=True).bfloat16()
    layer = CpuLinear(dense, int8_max_rows=4, pack=True, group_max_rows=2, group_bits=4)
    assert layer.int8_max_rows == 4 and layer.qweight is not None  # int8 still serves 3-4 rows
    two, four, eight = (torch.randn(n, 64).bfloat16() for n in (2, 4, 8))
    torch.testing.assert_close(layer(two), group_quant_linear_reference(two, layer.grouped, dense.bias))
    assert torch.equal(layer(eight), dense(eight))  # packed bf16: exact
    torch.testing.assert_close(layer(four).float(), dense(four).float(), atol=0.1, rtol=0.05)
    only_groups = CpuLinear(dense, int8_max_rows=4, pack=True, group_max_rows=4, group_bits=8)
    assert only_groups.qweight is None  # no int8 copy that no batch size would use


def test_config_refuses_unknown_mode():
    with pytest.raises(InvalidRequestError, match="group_quant='int3'"):
        EngineConfig(model="m", cache_dir=".", group_quant="int3")
    with pytest.raises(InvalidRequestError, match="group_quant_max_rows=-1"):
        EngineConfig(model="m", cache_dir=".", group_quant_max_rows=-1)


# ---- which linears get which form ------------------------------------------------------------


class FakeCheckpoint:
    def __init__(self, bits: dict[str, int]) -> None:
        self.bits = bits

    def weight_bits(self) -> dict[str, int]:
        return self.bits


def tiny_llama():
    from r1serve.models.arch_config import ArchConfig
    from r1serve.models.llama import LlamaForCausalLM

    cfg = ArchConfig.from_hf(dict(architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=64,
                                  intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                                  num_key_value_heads=2, rms_norm_eps=1e-5, max_position_embeddings=64,
                                  vocab_size=100, tie_word_embeddings=True))
    return LlamaForCausalLM(cfg)


def test_stored_bits_follow_the_widest_part():
    from r1serve.models.loader import _stored_bits

    model = tiny_llama()
    bits = {"model.embed_tokens.weight": 8}
    for i in range(2):
        layer = f"model.layers.{i}"
        bits |= {f"{layer}.self_attn.{p}_proj.weight": 4 for p in "qkvo"}
        bits |= {f"{layer}.mlp.{p}_proj.weight": 4 for p in ("gate", "up", "down")}
    bits["model.layers.1.self_attn.v_proj.weight"] = 6  # Q6_K: qkv_proj of layer 1 needs int8
    bits["model.layers.1.mlp.down_proj.weight"] = 16
    plan = _stored_bits(FakeCheckpoint(bits), model)
    assert plan["model.layers.0.self_attn.qkv_proj"] == 4 and plan["model.layers.0.mlp.gate_up_proj"] == 4
    assert plan["model.layers.1.self_attn.qkv_proj"] == 8
    assert "model.layers.1.mlp.down_proj" not in plan  # 16-bit: left to bf16 / int8 per channel
    assert plan["lm_head"] == 8  # tied to the Q8_0 embedding
    assert _stored_bits(object(), model) == {}  # an HF checkpoint: nothing stored below 16 bits


def test_gguf_reports_bits_per_tensor(tmp_path):
    from test_gguf_checkpoint import write_gguf

    from r1serve.models.gguf_checkpoint import GGUFCheckpoint

    x = np.random.default_rng(0).standard_normal((8, 64)).astype(np.float32)
    path = write_gguf(tmp_path / "bits.gguf", "llama", {
        "blk.0.ffn_up.weight": (gguf.quants.quantize(x, Q.Q4_1), Q.Q4_1),
        "blk.0.ffn_down.weight": (gguf.quants.quantize(x, Q.Q8_0), Q.Q8_0),
        "blk.0.ffn_gate.weight": (x.astype(np.float16), None),
    })
    assert GGUFCheckpoint(path, gguf.GGUFReader(path)).weight_bits() == {
        "model.layers.0.mlp.up_proj.weight": 4, "model.layers.0.mlp.down_proj.weight": 8,
        "model.layers.0.mlp.gate_proj.weight": 16}


@pytest.mark.slow
@needs_kernel
def test_smollm2_plan_and_answer(smollm2_gguf):
    """The Q4_1 SmolLM2: every layer linear in int4, the lm_head (tied to the Q8_0 embedding)
    in int8 groups, and the answer still right."""
    from r1serve import LLM, SamplingParams

    llm = LLM(str(smollm2_gguf))
    linears = {n: m for n, m in llm.engine.runner.model.named_modules() if isinstance(m, CpuLinear)}
    bits = {n: m.grouped.bits for n, m in linears.items() if m.grouped is not None}
    assert len(bits) == len(linears) == 121 and bits.pop("lm_head") == 8 and set(bits.values()) == {4}
    out = llm.chat([{"role": "user", "content": "What is the capital of France? Answer in one sentence."}],
                   SamplingParams(temperature=0, max_tokens=16))[0].outputs[0]
    assert "Paris" in out.text
    off = LLM(str(smollm2_gguf), group_quant="off")
    assert not any(m.grouped is not None for m in off.engine.runner.model.modules() if isinstance(m, CpuLinear))


def test_linears_are_rewritten_as_their_weights_complete():
    """The loader hands each linear to the platform once its last part is in: a fused qkv
    after v, gate_up after up, a tied lm_head with the embedding; each exactly once."""
    from r1serve.models.loader import _rewriting_linears

    model = tiny_llama()
    names = ["model.embed_tokens.weight", "model.norm.weight"]
    for i in range(2):
        p = f"model.layers.{i}"
        names += [f"{p}.self_attn.{w}_proj.weight" for w in "qkvo"]
        names += [f"{p}.mlp.{w}_proj.weight" for w in ("gate", "up", "down")]
        names += [f"{p}.input_layernorm.weight", f"{p}.post_attention_layernorm.weight"]
    params = dict(model.named_parameters())

    def shape(name):
        target, idx = model._fused_target(name)
        return params[target].shape if idx is None else model._fused_slice(params[target], idx, name).shape

    loaded: list[str] = []
    calls: list[tuple[str, str]] = []  # (linear rewritten, the last tensor loaded before)

    def weights():
        for name in names:
            loaded.append(name)
            yield name, torch.zeros(shape(name))

    model.load_weights(_rewriting_linears(weights(), model, lambda linear: calls.append((linear, loaded[-1]))))
    assert calls[0] == ("lm_head", "model.embed_tokens.weight")
    after = dict(calls)
    assert len(after) == len(calls) == 1 + 2 * 4  # lm_head, and qkv, o, gate_up, down per layer
    for i in range(2):
        p = f"model.layers.{i}"
        assert after[f"{p}.self_attn.qkv_proj"] == f"{p}.self_attn.v_proj.weight"
        assert after[f"{p}.mlp.gate_up_proj"] == f"{p}.mlp.up_proj.weight"
        assert after[f"{p}.mlp.down_proj"] == f"{p}.mlp.down_proj.weight"


@needs_kernel
@pytest.mark.parametrize("arch", ["llama", "qwen2"])  # qwen2: q/k/v biases, loaded after or before the weights
def test_rewriting_as_loaded_gives_the_model_rewritten_at_the_end(tmp_path, monkeypatch, arch):
    from tiny_models import make_checkpoint

    from r1serve import LLM, SamplingParams
    from r1serve.models.llama import LlamaForCausalLM

    path = make_checkpoint(tmp_path / arch, arch)

    def load():
        llm = LLM(str(path), dtype="float32", group_quant="int4", num_kv_blocks=8)
        model = llm.engine.runner.model
        linears = {n: m for n, m in model.named_modules() if isinstance(m, CpuLinear)}
        out = llm.generate({"prompt_token_ids": [5, 6, 7]}, SamplingParams(max_tokens=8, temperature=0, logprobs=2))
        lps = [{t: v.logprob for t, v in lp.items()} for lp in out[0].outputs[0].logprobs]
        return linears, lps

    as_loaded, lps = load()
    monkeypatch.setattr(LlamaForCausalLM, "rewrite_linears_as_loaded", False)
    at_end, want = load()
    assert as_loaded.keys() == at_end.keys() and len(at_end) > 0
    for n, m in at_end.items():
        assert torch.equal(as_loaded[n].grouped.packed, m.grouped.packed)
        assert (m.bias is None) == (as_loaded[n].bias is None)
        assert m.bias is None or torch.equal(as_loaded[n].bias, m.bias)
    assert any(m.bias is not None for m in at_end.values()) == (arch == "qwen2")
    assert lps == want
