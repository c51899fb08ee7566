"""Every Triton kernel against its plain-torch twin: on the CPU under TRITON_INTERPRET=1, or
compiled where a CUDA GPU is visible.

Small shapes: the interpreter runs each program with numpy. benchmarks/gpu_check.py runs the
same kernels on R1's shapes. Skipped, with the reason, where triton is absent.
"""
from __future__ import annotations

import pytest
import torch

import triton_interpreter
from paged_batches import random_paged_batch

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Before any r1serve.kernels.triton import: triton.jit reads the switch when it decorates.
UNAVAILABLE = triton_interpreter.enable() if DEVICE == "cpu" else triton_interpreter.unavailable()
if UNAVAILABLE:
    pytest.skip(UNAVAILABLE, allow_module_level=True)

from r1serve.kernels.fp8_gemm import act_quant_reference, fp8_block_gemm_reference  # noqa: E402
from r1serve.kernels.fused_moe import fused_moe_reference  # noqa: E402
from r1serve.kernels.fused_moe_fp8 import fused_moe_fp8_reference  # noqa: E402
from r1serve.kernels.mla_attention import mla_absorbed_reference, write_latent  # noqa: E402
from r1serve.kernels.paged_attention import paged_attention_reference, write_kv  # noqa: E402
from r1serve.kernels.rms_norm import add_rms_norm_reference  # noqa: E402
from r1serve.kernels.rotary_kv_write import rotary_kv_write_reference  # noqa: E402
from r1serve.kernels.triton.add_rms_norm import add_rms_norm_triton  # noqa: E402
from r1serve.kernels.triton.fp8_act_quant import act_quant_triton  # noqa: E402
from r1serve.kernels.triton.fp8_gemm import fp8_block_gemm_triton  # noqa: E402
from r1serve.kernels.triton.fused_moe import fused_moe_fp8_triton, fused_moe_triton, moe_align_block_size  # noqa: E402
from r1serve.kernels.triton.kv_cache_write import write_kv_triton, write_latent_triton  # noqa: E402
from r1serve.kernels.triton.mla_decode_attention import mla_decode_attention_triton  # noqa: E402
from r1serve.kernels.triton.paged_decode_attention import (choose_num_splits,  # noqa: E402
                                                          paged_decode_attention_triton)
from r1serve.kernels.triton.rotary_kv_write import rotary_kv_write_triton  # noqa: E402
from r1serve.kernels.attention_metadata import AttentionMetadata  # noqa: E402
from r1serve.kernels.fp8_block import quantize_fp8_block  # noqa: E402
from r1serve.platforms.cuda.fp8_linear import Fp8BlockLinear  # noqa: E402


DIFFERS = triton_interpreter.problems() if DEVICE == "cpu" else []
# bfloat16 and FP8 results depend on the interpreter rounding as the GPU does.
faithful = pytest.mark.skipif(bool(DIFFERS), reason=f"the triton interpreter here differs from a GPU: {DIFFERS}")

HALF = [torch.float32, pytest.param(torch.bfloat16, marks=faithful), torch.float16]
# Attention and GEMM outputs: within a couple of ulps of the output dtype.
TOL = {torch.float32: 1e-5, torch.bfloat16: 2e-2, torch.float16: 2e-3}


@pytest.fixture(autouse=True)
def on_device():
    with torch.device(DEVICE):  # tensors made without a device land on the kernels' device
        yield


def close(actual: torch.Tensor, expected: torch.Tensor, dtype: torch.dtype, scale: float = 1.0) -> None:
    tol = TOL[dtype] * scale
    torch.testing.assert_close(actual.float(), expected.float(), atol=tol, rtol=tol)


def test_interpreter_rounds_as_the_gpu_does():
    assert DIFFERS == []


# ---- cache writes ------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF)
def test_write_kv_matches_twin_and_skips_padding(dtype):
    _, k_cache, v_cache, _ = random_paged_batch([8], [8], Hkv=2, D=32, num_blocks=16, dtype=dtype, device=DEVICE)
    k, v = torch.randn(4, 2, 32).to(dtype), torch.randn(4, 2, 32).to(dtype)
    slots = torch.tensor([5, -1, 63, 0])
    got_k, got_v = k_cache.clone(), v_cache.clone()
    write_kv_triton(got_k, got_v, k, v, slots)
    real = slots >= 0
    want_k, want_v = k_cache.clone(), v_cache.clone()
    write_kv(want_k, want_v, k[real], v[real], slots[real])
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


def test_write_kv_takes_rows_of_a_fused_projection():
    qkv = torch.randn(3, 6 * 16)  # [q (2 heads) | k (2) | v (2)] per token: k and v rows are strided views
    k, v = qkv[:, 32:64].view(3, 2, 16), qkv[:, 64:].view(3, 2, 16)
    got_k, got_v = torch.zeros(4, 4, 2, 16), torch.zeros(4, 4, 2, 16)
    write_kv_triton(got_k, got_v, k, v, torch.tensor([1, 7, 12]))
    want_k, want_v = torch.zeros(4, 4, 2, 16), torch.zeros(4, 4, 2, 16)
    write_kv(want_k, want_v, k, v, torch.tensor([1, 7, 12]))
    assert torch.equal(got_k, want_k) and torch.equal(got_v, want_v)


@pytest.mark.parametrize("dtype", HALF)
def test_write_latent_matches_twin(dtype):
    cache = torch.randn(1, 8, 4, 80).to(dtype)  # L + R = 80: not a power of two, masked
    latent = torch.randn(3, 80).to(dtype)
    slots = torch.tensor([30, -1, 2])
    got, want = cache.clone(), cache.clone()
    write_latent_triton(got, latent, slots)
    write_latent(want, latent[[0, 2]], slots[[0, 2]])
    assert torch.equal(got, want)


def test_write_rejects_mismatched_rows():
    with pytest.raises(AssertionError, match="does not fit"):
        write_latent_triton(torch.zeros(1, 8, 4, 80), torch.zeros(3, 72), torch.tensor([0, 1, 2]))


@pytest.mark.parametrize("dtype", HALF)
def test_rotary_kv_write_matches_twin(dtype):
    g = torch.Generator(DEVICE).manual_seed(1)
    H, Hkv, D, N = 6, 2, 32, 5
    qkv = torch.randn(N, (H + 2 * Hkv) * D, generator=g).to(dtype)
    angle = torch.rand(N, 1, D // 2, generator=g) * 6
    cos, sin = angle.cos().to(dtype), angle.sin().to(dtype)
    cache = torch.randn(2, 8, 4, Hkv, D, generator=g).to(dtype)
    slots = torch.tensor([3, 9, 30, 0, 17])
    got_cache, want_cache = cache.clone(), cache.clone()
    got = rotary_kv_write_triton(qkv, cos, sin, got_cache, slots, H)
    want = rotary_kv_write_reference(qkv, cos, sin, want_cache, slots, H)
    close(got, want, dtype)
    close(got_cache, want_cache, dtype)


# ---- fused add + RMSNorm --------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("with_x", [True, False], ids=["add", "norm-only"])
def test_add_rms_norm_matches_twin(dtype, with_x):
    g = torch.Generator(DEVICE).manual_seed(2)
    residual, x, weight = (torch.randn(*s, generator=g).to(dtype) for s in ((5, 96), (5, 96), (96,)))
    out, h = add_rms_norm_triton(x if with_x else None, residual, weight, 1e-6)
    want_out, want_h = add_rms_norm_reference(x if with_x else None, residual, weight, 1e-6)
    assert torch.equal(h, want_h)
    close(out, want_out, dtype)


# ---- paged decode attention (GQA, split-K) ------------------------------------------------------


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("num_splits", [None, 1, 3])
@pytest.mark.parametrize("heads", [(8, 2), (4, 4)], ids=["gqa4", "mha"])
def test_paged_decode_attention_matches_twin(dtype, num_splits, heads):
    H, Hkv = heads
    q, kc, vc, meta = random_paged_batch([1, 7, 40, 150], [1] * 4, H=H, Hkv=Hkv, D=32, bs=4, num_blocks=64,
                                         dtype=dtype, device=DEVICE)
    got = paged_decode_attention_triton(q, kc, vc, meta, 0.2, num_splits=num_splits)
    close(got, paged_attention_reference(q, kc, vc, meta, 0.2), dtype)


def test_split_count_grows_with_context_and_shrinks_with_batch():
    assert choose_num_splits(100, 8) == 1  # short contexts: one split
    assert choose_num_splits(8192, 8) == 16  # one long sequence: fill the GPU
    assert choose_num_splits(8192, 1024) == 1  # a big batch already fills it


def test_decode_attention_refuses_prefill():
    q, kc, vc, meta = random_paged_batch([5], [5], device=DEVICE)
    with pytest.raises(AssertionError, match="one query per sequence"):
        paged_decode_attention_triton(q, kc, vc, meta, 0.2)


# ---- MLA decode attention (absorbed, latent cache) ------------------------------------------------


def latent_batch(seq_lens, H=20, L=64, R=16, bs=8, num_blocks=64, dtype=torch.float32):
    g = torch.Generator(DEVICE).manual_seed(3)
    cache = torch.randn(1, num_blocks, bs, L + R, generator=g).to(dtype)
    perm = torch.randperm(num_blocks, generator=g).tolist()
    width = max(-(-s // bs) for s in seq_lens)
    tables, slots = [], []
    for s in seq_lens:
        n = -(-s // bs)
        table, perm = perm[:n], perm[n:]
        tables.append(table + [0] * (width - n))
        slots.append(table[(s - 1) // bs] * bs + (s - 1) % bs)
    meta = AttentionMetadata.build([1] * len(seq_lens), seq_lens, torch.tensor(slots), torch.tensor(tables), bs)
    q_lat = torch.randn(len(seq_lens), H, L, generator=g).to(dtype)
    q_pe = torch.randn(len(seq_lens), H, R, generator=g).to(dtype)
    return q_lat, q_pe, cache, meta


@pytest.mark.parametrize("dtype", HALF)
@pytest.mark.parametrize("num_splits", [None, 3])
def test_mla_decode_attention_matches_twin(dtype, num_splits):
    q_lat, q_pe, cache, meta = latent_batch([1, 9, 70, 200], dtype=dtype)  # 20 heads: a partial head block
    got = mla_decode_attention_triton(q_lat, q_pe, cache, meta, 64, 0.1, num_splits=num_splits)
    close(got, mla_absorbed_reference(q_lat, q_pe, cache, meta, 64, 0.1), dtype)


# ---- FP8: activation quantization, block-scaled GEMM, linear ------------------------------------


@faithful
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_act_quant_matches_twin_exactly(dtype):
    x = (torch.randn(5, 96, generator=torch.Generator(DEVICE).manual_seed(4)) * 50).to(dtype)
    x[1, :32] = 0  # an all-zero group: scaled by the floor, not divided by zero
    got_q, got_s = act_quant_triton(x, 32)
    want_q, want_s = act_quant_reference(x, 32)
    assert torch.equal(got_s, want_s)
    assert torch.equal(got_q.view(torch.uint8), want_q.view(torch.uint8))


@faithful
@pytest.mark.parametrize("out_dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("M", [1, 37])
def test_fp8_block_gemm_matches_twin(out_dtype, M):
    g = torch.Generator(DEVICE).manual_seed(5)
    x_q, x_s = act_quant_reference(torch.randn(M, 96, generator=g), 32)
    w_q, w_s = quantize_fp8_block(torch.randn(72, 96, generator=g), (32, 32))  # 72 rows: a partial weight block
    got = fp8_block_gemm_triton(x_q, x_s, w_q, w_s, (32, 32), out_dtype)
    close(got, fp8_block_gemm_reference(x_q, x_s, w_q, w_s, (32, 32), out_dtype), out_dtype, scale=10)


@faithful
def test_fp8_linear_with_kernels_matches_twins():
    w_q, w_s = quantize_fp8_block(torch.randn(64, 96), (32, 32))
    x = torch.randn(2, 3, 96).to(torch.bfloat16)
    reference = Fp8BlockLinear(w_q, w_s, (32, 32), bias=torch.randn(64).to(torch.bfloat16))
    kernel = Fp8BlockLinear(w_q, w_s, (32, 32), bias=reference.bias)
    kernel.fp8_act_quant, kernel.fp8_block_gemm = act_quant_triton, fp8_block_gemm_triton
    close(kernel(x), reference(x), torch.bfloat16)


# ---- fused MoE -------------------------------------------------------------------------------------


def routing(N=7, E=8, K=3, seed=6):
    g = torch.Generator(DEVICE).manual_seed(seed)
    ids = torch.stack([torch.randperm(E, generator=g)[:K] for _ in range(N)])
    return torch.rand(N, K, generator=g), ids


def test_moe_alignment_groups_every_pair_once_in_whole_blocks():
    weights, ids = routing(N=9, E=8, K=3)
    sorted_ids, block_expert, num_padded = moe_align_block_size(ids, 8, 4)
    P, used = ids.numel(), int(num_padded)
    assert used % 4 == 0 and sorted_ids.numel() % 4 == 0
    pairs = sorted_ids[:used]
    assert sorted(pairs[pairs < P].tolist()) == list(range(P))  # every pair exactly once
    assert (sorted_ids[used:] == P).all()  # nothing past the padded end
    for b in range(used // 4):
        rows = pairs[4 * b: 4 * b + 4]
        real = rows[rows < P].long()
        assert len(real) and (ids.view(-1)[real] == block_expert[b]).all()  # one expert per block


@pytest.mark.parametrize("dtype", HALF)
def test_fused_moe_matches_twin(dtype):
    g = torch.Generator(DEVICE).manual_seed(7)
    E, inter, hidden = 8, 64, 96
    x = torch.randn(7, hidden, generator=g).to(dtype)
    w13 = (torch.randn(E, 2 * inter, hidden, generator=g) / 10).to(dtype)
    w2 = (torch.randn(E, hidden, inter, generator=g) / 10).to(dtype)
    weights, ids = routing(E=E)
    close(fused_moe_triton(x, w13, w2, weights, ids), fused_moe_reference(x, w13, w2, weights, ids), dtype)


@faithful
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_fused_moe_fp8_matches_twin(dtype):
    g = torch.Generator(DEVICE).manual_seed(8)
    E, inter, hidden, block = 8, 64, 96, (32, 32)
    x = torch.randn(7, hidden, generator=g).to(dtype)
    w13, s13 = zip(*(quantize_fp8_block(torch.randn(2 * inter, hidden, generator=g) / 10, block) for _ in range(E)))
    w2, s2 = zip(*(quantize_fp8_block(torch.randn(hidden, inter, generator=g) / 10, block) for _ in range(E)))
    w13, s13, w2, s2 = (torch.stack(t) for t in (w13, s13, w2, s2))
    weights, ids = routing(E=E)
    got = fused_moe_fp8_triton(x, w13, s13, w2, s2, weights, ids, block)
    close(got, fused_moe_fp8_reference(x, w13, s13, w2, s2, weights, ids, block), dtype)


# ---- the cuda platform's kernels in a whole model ----------------------------------------------------


@pytest.fixture(scope="module")
def tiny_llama(tmp_path_factory):
    from tiny_models import make_checkpoint

    return make_checkpoint(tmp_path_factory.mktemp("llama"), "llama", num_attention_heads=4, num_key_value_heads=2)


@pytest.fixture(scope="module")
def tiny_deepseek(tmp_path_factory):
    from tiny_models import DEEPSEEK_V3_TINY, write_deepseek_v3

    # A 16-wide rope: the smallest the MLA decode kernel's tiles take (8 would fall back to the twin).
    return write_deepseek_v3(tmp_path_factory.mktemp("dsv3"), dict(DEEPSEEK_V3_TINY, qk_rope_head_dim=16), mtp=False)


@pytest.mark.parametrize("arch", ["tiny_llama", "tiny_deepseek"])
def test_models_on_the_triton_kernels_generate_as_on_the_twins(arch, request):
    from r1serve import LLM, SamplingParams
    from r1serve.platforms.base import bind_kernels
    from r1serve.platforms.cuda.kernel_table import triton_table

    path = request.getfixturevalue(arch)
    prompts = [{"prompt_token_ids": [5, 17, 42, 99, 3]}, {"prompt_token_ids": [11, 12, 300, 7]}]
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=0)
    opts = dict(dtype="float32", num_kv_blocks=32, block_size=8, kernel="reference", device=DEVICE)
    want = LLM(model=str(path), **opts).generate(prompts, params)
    llm = LLM(model=str(path), **opts)
    bind_kernels(llm.engine.loaded.model, triton_table())  # what the cuda platform's bind does
    got = llm.generate(prompts, params)
    for g, w in zip(got, want):
        assert g.outputs[0].token_ids == w.outputs[0].token_ids
        got_lp = [lp[t].logprob for lp, t in zip(g.outputs[0].logprobs, g.outputs[0].token_ids)]
        want_lp = [lp[t].logprob for lp, t in zip(w.outputs[0].logprobs, w.outputs[0].token_ids)]
        assert got_lp == pytest.approx(want_lp, abs=1e-4)


def test_cuda_kernel_table_binds_every_op_unless_reference(tiny_llama, tiny_deepseek):
    from r1serve import LLM
    from r1serve.layers.attention import PagedAttention
    from r1serve.layers.norm import RMSNorm
    from r1serve.platforms.base import bind_kernels
    from r1serve.platforms.cuda import kernel_table

    model = LLM(model=str(tiny_llama), dtype="float32", num_kv_blocks=8, block_size=8, kernel="reference",
                device=DEVICE).engine.loaded.model
    norms = [m for m in model.modules() if isinstance(m, RMSNorm)]
    assert all(m.add_rms_norm is add_rms_norm_reference for m in norms)  # kernel="reference": the twins
    bound = {b.op: b.kernel for b in bind_kernels(model, kernel_table.triton_table())}
    assert bound == {"add_rms_norm": "triton", "paged_attention": "triton", "rotary_kv_write": "triton",
                     "silu_and_mul": "reference", "decode_layer": "reference"}  # a GPU's layers: CUDA graphs
    assert all(m.add_rms_norm is kernel_table.add_rms_norm for m in norms)
    assert all(m.paged_attention is kernel_table.paged_attention for m in model.modules()
               if isinstance(m, PagedAttention))
    deepseek = LLM(model=str(tiny_deepseek), dtype="float32", num_kv_blocks=8, block_size=8, kernel="reference",
                   device=DEVICE).engine.loaded.model
    bound = {b.op: b.kernel for b in bind_kernels(deepseek, kernel_table.triton_table())}
    # DeepSeek-V3's dense layers and shared experts are the same GatedMLP as Llama's
    assert bound["mla_absorbed"] == bound["mla_write_latent"] == bound["moe_experts"] == "triton"
    assert "silu_and_mul" in bound


def test_rotary_fallback_for_odd_head_sizes_still_skips_padding_slots():
    from r1serve.platforms.cuda.kernel_table import rotary_kv_write

    g = torch.Generator(DEVICE).manual_seed(9)
    H, Hkv, D, N = 4, 2, 24, 3  # 24: no power of two, the fused kernel's tiles do not take it
    qkv = torch.randn(N, (H + 2 * Hkv) * D, generator=g)
    angle = torch.rand(N, 1, D // 2, generator=g)
    cache = torch.randn(2, 4, 4, Hkv, D, generator=g)
    slots = torch.tensor([2, -1, 9])
    got_cache, want_cache = cache.clone(), cache.clone()
    got = rotary_kv_write(qkv, angle.cos(), angle.sin(), got_cache, slots, H)
    want = rotary_kv_write_reference(qkv[[0, 2]], angle[[0, 2]].cos(), angle[[0, 2]].sin(), want_cache, slots[[0, 2]], H)
    torch.testing.assert_close(got[[0, 2]], want)
    assert torch.equal(got_cache, want_cache)  # the last slot (where -1 would wrap) is untouched
