"""Keeping a checkpoint's FP8 weights as FP8 (platforms/cuda/fp8_weights.py), on a tiny R1-format model.

Runs on the CPU with the plain-torch twins; the Triton kernels behind Fp8BlockLinear and
Fp8Experts are checked against the same twins in test_triton_kernels.py.
"""
from __future__ import annotations

import pytest
import torch

from r1serve import LLM, SamplingParams
from r1serve.kernels.fp8_gemm import fp8_linear_reference
from r1serve.kernels.fp8_block import dequantize_fp8_block, quantize_fp8_block
from r1serve.platforms.cuda.fp8_linear import Fp8BlockLinear, Fp8Experts
from r1serve.models.hf_checkpoint import HFCheckpoint
from r1serve.platforms.cuda.fp8_weights import iter_fp8_block_weights, keep_fp8_weights

from tiny_models import make_deepseek_v3, to_fp8_checkpoint

pytestmark = pytest.mark.usefixtures("one_thread")
BLOCK = (32, 32)
PROMPTS = [[5, 17, 42, 99, 3, 250, 7], [11, 12]]


@pytest.fixture(scope="module")
def fp8_checkpoint(tmp_path_factory):
    root = tmp_path_factory.mktemp("fp8")
    return to_fp8_checkpoint(make_deepseek_v3(root / "bf16", mtp=False), root / "fp8", block=BLOCK)


def prefill_logits(llm: LLM) -> torch.Tensor:
    engine = llm.engine
    for i, p in enumerate(PROMPTS):
        engine.add_request(str(i), p, SamplingParams(max_tokens=1))
    logits = engine.runner.compute_logits(engine.scheduler.schedule())
    for i in range(len(PROMPTS)):
        engine.abort_request(str(i))
    return logits


def test_fp8_weights_land_where_the_dequantized_ones_were(fp8_checkpoint):
    llm = LLM(model=str(fp8_checkpoint), dtype="float32", num_kv_blocks=32, block_size=8)
    model = llm.engine.loaded.model
    loaded = {k: v.clone() for k, v in model.state_dict().items()}
    before = prefill_logits(llm)

    kept = keep_fp8_weights(model, iter_fp8_block_weights(HFCheckpoint.open(fp8_checkpoint)), BLOCK)

    linears = {n: m for n, m in model.named_modules() if isinstance(m, Fp8BlockLinear)}
    experts = {n: m.moe_experts for n, m in model.named_modules() if isinstance(getattr(m, "moe_experts", None),
                                                                                 Fp8Experts)}
    assert "model.layers.0.mlp.gate_up_proj" in linears  # fused gate | up halves
    assert "model.layers.1.mlp.shared_experts.down_proj" in linears and "model.layers.2.self_attn.o_proj" in linears
    assert set(experts) == {"model.layers.1.mlp", "model.layers.2.mlp"}  # stacked per-expert tensors
    # kv_b_proj's 16 input columns are not a whole 32-column block: it stays dequantized.
    assert not any("kv_b_proj" in n for n in linears)
    assert len(kept) == len(linears) + 2 * len(experts)
    for name, lin in linears.items():
        assert torch.equal(dequantize_fp8_block(lin.weight, lin.weight_scale_inv, BLOCK), loaded[f"{name}.weight"])
    for name, e in experts.items():
        for i in range(e.w13.shape[0]):
            assert torch.equal(dequantize_fp8_block(e.w13[i], e.w13_scale[i], BLOCK), loaded[f"{name}.w13"][i])
            assert torch.equal(dequantize_fp8_block(e.w2[i], e.w2_scale[i], BLOCK), loaded[f"{name}.w2"][i])
        assert model.get_submodule(name).w13.numel() == 0  # the dequantized copy is freed

    # The model still runs; only the FP8 rounding of activations separates it from before.
    after = prefill_logits(llm)
    assert torch.isfinite(after).all()
    assert (after - before).norm() / before.norm() < 0.5
    assert not torch.equal(after, before)


def test_fp8_linear_quantizes_activations_per_group():
    w_q, w_s = quantize_fp8_block(torch.randn(48, 64), BLOCK)  # 48 rows: a partial block
    lin = Fp8BlockLinear(w_q, w_s, BLOCK)
    x = torch.randn(2, 5, 64)
    assert torch.equal(lin(x), fp8_linear_reference(x.view(10, 64), w_q, w_s, BLOCK).view(2, 5, 48))
    exact = x @ dequantize_fp8_block(w_q, w_s, BLOCK).T
    assert ((lin(x) - exact).norm() / exact.norm()) < 0.05  # e4m3 activations: ~2% error


def test_fp8_linear_refuses_partial_column_blocks():
    w_q, w_s = quantize_fp8_block(torch.randn(32, 48), BLOCK)
    with pytest.raises(ValueError, match="multiple of the column block 32"):
        Fp8BlockLinear(w_q, w_s, BLOCK)
