"""Every kernel against its plain-torch twin."""
from __future__ import annotations

import pytest
import torch
from torch import nn

from paged_batches import random_paged_batch
from r1serve.kernels.cpu_decode_attention import cpu_attention, decode_attention
from r1serve.kernels.cpu_extension import cpu_kernels
from r1serve.kernels.cpu_paged_decode import paged_decode_attention
from r1serve.kernels.rms_norm import add_rms_norm, add_rms_norm_reference
from r1serve.kernels.onednn_linear import (CANDIDATE_ROWS, PAD_TO_ROWS, measure_padding, pack_weight, packed_linear,
                                           packing_available)
from r1serve.platforms.cpu.linear import CpuLinear
from r1serve.kernels.paged_attention import paged_attention_reference, write_kv


needs_cpp = pytest.mark.skipif(cpu_kernels() is None, reason="no C++ compiler: the CPU kernels are not built")


def dense_attention(q, k_cache, v_cache, meta, scale):
    """Independent oracle: per sequence, contiguous K/V and an explicit causal softmax."""
    out, start = [], 0
    for b, (s, n) in enumerate(zip(meta.seq_lens, meta.query_lens)):
        slots = meta.key_slots[b, :s]
        k = k_cache.reshape(-1, *k_cache.shape[2:])[slots].float()  # (s, Hkv, D)
        v = v_cache.reshape(-1, *v_cache.shape[2:])[slots].float()
        group = q.shape[1] // k.shape[1]
        k, v = k.repeat_interleave(group, 1), v.repeat_interleave(group, 1)  # (s, H, D)
        qs = q[start:start + n].float()
        scores = torch.einsum("qhd,khd->hqk", qs, k) * scale
        causal = torch.arange(s)[None, :] <= (s - n + torch.arange(n))[:, None]
        scores = scores.masked_fill(~causal, float("-inf"))
        out.append(torch.einsum("hqk,khd->qhd", scores.softmax(-1), v))
        start += n
    return torch.cat(out)


@pytest.mark.parametrize("seq_lens,query_lens", [
    ([5, 17, 1, 33], [5, 17, 1, 33]),  # prefill of several lengths
    ([20, 9, 40], [4, 9, 1]),  # chunked prefill after a cached prefix, mixed with decode
])
def test_reference_attention_matches_dense_oracle(seq_lens, query_lens):
    q, kc, vc, meta = random_paged_batch(seq_lens, query_lens)
    torch.testing.assert_close(paged_attention_reference(q, kc, vc, meta, 0.2), dense_attention(q, kc, vc, meta, 0.2),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("seq_lens", [[1], [7, 1, 30, 64], [50] * 3])
def test_decode_attention_matches_twin(seq_lens, dtype, tol):
    q, kc, vc, meta = random_paged_batch(seq_lens, [1] * len(seq_lens), dtype=dtype)
    expected = paged_attention_reference(q, kc, vc, meta, 0.125).float()
    torch.testing.assert_close(cpu_attention(q, kc, vc, meta, 0.125).float(), expected, atol=tol, rtol=tol)


@pytest.mark.parametrize("seq_lens,query_lens", [
    ([5, 17, 1, 33], [5, 17, 1, 33]),  # prefills of several lengths
    ([20, 9, 40, 3], [1, 9, 1, 2]),  # decodes mixed with prefill chunks after a cached prefix
])
def test_cpu_attention_mixed_batches_match_twin(seq_lens, query_lens):
    q, kc, vc, meta = random_paged_batch(seq_lens, query_lens)
    torch.testing.assert_close(cpu_attention(q, kc, vc, meta, 0.2), paged_attention_reference(q, kc, vc, meta, 0.2),
                               atol=1e-5, rtol=1e-5)


def test_write_kv_lands_in_the_right_slots():
    kc, vc = torch.zeros(4, 2, 1, 3), torch.zeros(4, 2, 1, 3)
    k = torch.arange(6.0).view(2, 1, 3)
    write_kv(kc, vc, k, -k, torch.tensor([5, 0]))  # slot 5 = block 2, offset 1
    assert torch.equal(kc[2, 1, 0], k[0, 0]) and torch.equal(kc[0, 0, 0], k[1, 0])
    assert torch.equal(vc[2, 1, 0], -k[0, 0]) and kc.abs().sum() == k.sum()


needs_onednn = pytest.mark.skipif(not packing_available(), reason="oneDNN bf16 GEMM not available on this CPU")


@needs_onednn
@pytest.mark.parametrize("rows", [1, 5, 32, 130])
def test_packed_linear_is_bit_identical_to_twin(rows):
    torch.manual_seed(0)
    w, b = torch.randn(96, 64).bfloat16(), torch.randn(96).bfloat16()
    x = torch.randn(rows, 64).bfloat16()
    assert torch.equal(packed_linear(x, pack_weight(w), b), torch.nn.functional.linear(x, w, b))


@needs_onednn
def test_cpu_linear_packed_for_onednn_is_the_dense_linear():
    torch.manual_seed(0)
    dense = nn.Linear(64, 32, bias=True).bfloat16()
    w = dense.weight.detach()
    layer = CpuLinear(32, 64, dense.bias, dense=w, pack=True)
    for rows in (1, 2, 8, 40):
        x = torch.randn(rows, 64).bfloat16()
        assert torch.equal(layer(x), dense(x))  # packed bf16: exact at every batch size
    assert layer.weight is None and layer.packed is not None  # the packed copy replaced it
    unpacked = CpuLinear(32, 64, dense.bias, dense=w, pack=False)
    x = torch.randn(8, 64).bfloat16()
    assert torch.equal(unpacked(x), dense(x)) and unpacked.weight is w


@needs_onednn
@pytest.mark.parametrize("rows", [7, 8, 20, 32, 33])
def test_padded_small_batches_match_the_unpadded_rows(rows):
    """Padding to PAD_TO_ROWS changes which oneDNN kernel runs, not the rows' values (beyond
    bf16 accumulation order); rows outside the band are not padded at all."""
    torch.manual_seed(0)
    dense = nn.Linear(96, 80, bias=True).bfloat16()
    layer = CpuLinear(80, 96, dense.bias, dense=dense.weight.detach(), pack=True)
    layer.pad_from_rows = 8
    x = torch.randn(rows, 96).bfloat16()
    got = layer(x)
    assert got.shape == (rows, 80) and got.is_contiguous()
    torch.testing.assert_close(got.float(), dense(x).float(), atol=2e-2, rtol=2e-2)
    if rows < 8 or rows >= PAD_TO_ROWS:
        assert torch.equal(got, dense(x))


@needs_onednn
def test_measure_padding_answers_a_candidate_or_never():
    w = pack_weight(torch.randn(64, 96).bfloat16())
    assert measure_padding([w, w], 96, rounds=2) in (0,) + CANDIDATE_ROWS


# (activations, cache) dtypes: the same, or a cache narrower or wider (kv_cache_dtype)
CACHE_DTYPES = [(torch.float32, torch.float32, 1e-5), (torch.bfloat16, torch.bfloat16, 2e-2),
                (torch.float32, torch.bfloat16, 1e-5), (torch.bfloat16, torch.float32, 2e-2)]


@pytest.mark.parametrize("dtype,cache_dtype,tol", CACHE_DTYPES)
@pytest.mark.parametrize("seq_lens", [[1], [7, 1, 30, 64], [50] * 3])
def test_torch_decode_path_matches_twin(seq_lens, dtype, cache_dtype, tol):
    """The fallback used where the C++ kernel cannot be compiled."""
    q, kc, vc, meta = random_paged_batch(seq_lens, [1] * len(seq_lens), dtype=dtype)
    kc, vc = kc.to(cache_dtype), vc.to(cache_dtype)
    expected = paged_attention_reference(q, kc, vc, meta, 0.125).float()
    got = decode_attention(q, kc, vc, meta.key_slots, meta.attn_mask[:, :, :1, :], 0.125).float()
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@needs_cpp
@pytest.mark.parametrize("dtype,cache_dtype,tol", CACHE_DTYPES)
@pytest.mark.parametrize("seq_lens", [[1], [7, 1, 30, 64], [50] * 3, [200, 5]])
def test_paged_decode_kernel_matches_twin(seq_lens, dtype, cache_dtype, tol, isa_kernels):
    q, kc, vc, meta = random_paged_batch(seq_lens, [1] * len(seq_lens), dtype=dtype, num_blocks=96)
    kc, vc = kc.to(cache_dtype), vc.to(cache_dtype)
    expected = paged_attention_reference(q, kc, vc, meta, 0.125).float()
    got = paged_decode_attention(q, kc, vc, meta.block_tables, meta.seq_lens_tensor, 0.125, isa_kernels).float()
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@needs_cpp
@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-5), (torch.bfloat16, 2e-2)])
@pytest.mark.parametrize("H,Hkv,D,bs", [(9, 3, 64, 16), (12, 2, 128, 16), (4, 4, 256, 8), (8, 1, 32, 4),
                                        (4, 2, 48, 4), (4, 2, 20, 4)])
def test_paged_decode_kernel_head_shapes(H, Hkv, D, bs, dtype, tol, isa_kernels):
    """Head sizes with a vector path (32, 64, 128, 256) and without (48, 20), groups of 1 to 8,
    contexts that end inside a block and on a 16-row boundary."""
    seq_lens = [1, 16, 33, 70, 128]
    q, kc, vc, meta = random_paged_batch(seq_lens, [1] * len(seq_lens), H=H, Hkv=Hkv, D=D, bs=bs, dtype=dtype,
                                         num_blocks=sum(-(-s // bs) for s in seq_lens) + 3)
    expected = paged_attention_reference(q, kc, vc, meta, 0.125).float()
    got = paged_decode_attention(q, kc, vc, meta.block_tables, meta.seq_lens_tensor, 0.125, isa_kernels).float()
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 40])
@pytest.mark.parametrize("with_x", [True, False])
@pytest.mark.parametrize("D", [200, 576, 90])  # 90: not a whole number of registers on any ISA
def test_add_rms_norm_matches_twin(dtype, rows, with_x, D, isa_kernels):
    torch.manual_seed(0)
    res = torch.randn(rows, D).to(dtype)
    x = torch.randn(rows, D).to(dtype) if with_x else None
    w = (torch.rand(D) + 0.5).to(dtype)
    got, got_h = add_rms_norm(x, res, w, 1e-5, isa_kernels)
    expected, expected_h = add_rms_norm_reference(x, res, w, 1e-5)
    assert torch.equal(got_h, expected_h)  # the residual stream is exact
    tol = 1e-5 if dtype == torch.float32 else 1e-2
    torch.testing.assert_close(got, expected, atol=tol, rtol=tol)
    if with_x:
        assert not torch.equal(got_h, res)  # the caller's residual is not overwritten


def rope_tables(N, D, dtype, seed=0):
    g = torch.Generator().manual_seed(seed)
    pos = torch.randint(0, 4000, (N,), generator=g)
    freqs = pos[:, None].float() * (1 / 10000 ** (torch.arange(0, D, 2) / D))[None]
    return freqs.cos()[:, None].to(dtype), freqs.sin()[:, None].to(dtype)  # (N, 1, D/2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,H,Hkv,D", [(1, 9, 3, 64), (5, 4, 2, 16), (40, 6, 6, 32)])
def test_rotary_kv_write_twin_is_the_layer_code(N, H, Hkv, D, dtype):
    """The twin is exactly the unfused path: split, apply_rotary, write_kv."""
    from r1serve.kernels.rotary_kv_write import rotary_kv_write_reference
    from r1serve.layers.rotary import apply_rotary

    qkv = torch.randn(N, (H + 2 * Hkv) * D).to(dtype)
    cos, sin = rope_tables(N, D, dtype)
    slots = torch.randperm(128)[:N]
    kv, expected_kv = torch.randn(2, 8, 16, Hkv, D).to(dtype), None
    expected_kv = kv.clone()
    q, k, v = qkv.split([H * D, Hkv * D, Hkv * D], dim=-1)
    q_rot, k_rot = apply_rotary(q.view(N, H, D), k.view(N, Hkv, D), (cos, sin))
    write_kv(expected_kv[0], expected_kv[1], k_rot, v.view(N, Hkv, D), slots)
    assert torch.equal(rotary_kv_write_reference(qkv, cos, sin, kv, slots, H), q_rot)
    assert torch.equal(kv, expected_kv)


@needs_cpp
@pytest.mark.parametrize("dtype,cache_dtype,tol", CACHE_DTYPES)
@pytest.mark.parametrize("N,H,Hkv,D", [(1, 9, 3, 64), (5, 4, 2, 16), (40, 6, 6, 32)])
def test_rotary_kv_write_kernel_is_bit_identical_to_twin(N, H, Hkv, D, dtype, cache_dtype, tol, isa_kernels):
    from r1serve.kernels.rotary_kv_write import rotary_kv_write, rotary_kv_write_reference

    qkv = torch.randn(N, (H + 2 * Hkv) * D).to(dtype)
    cos, sin = rope_tables(N, D, dtype)
    slots = torch.randperm(128)[:N]
    kv = torch.randn(2, 8, 16, Hkv, D).to(cache_dtype)
    kv_twin = kv.clone()
    assert torch.equal(rotary_kv_write(qkv, cos, sin, kv, slots, H, isa_kernels),
                       rotary_kv_write_reference(qkv, cos, sin, kv_twin, slots, H))
    assert torch.equal(kv, kv_twin)  # the same slots written, nothing else touched


@needs_cpp
def test_rotary_kv_write_refuses_bad_slots_and_shapes():
    from r1serve.kernels.rotary_kv_write import rotary_kv_write

    qkv, kv = torch.randn(2, 4 * 8), torch.zeros(2, 2, 4, 1, 8)
    cos, sin = rope_tables(2, 8, torch.float32)
    with pytest.raises(RuntimeError, match="slot 8 outside"):
        rotary_kv_write(qkv, cos, sin, kv, torch.tensor([0, 8]), 2)
    assert kv.abs().sum() == 0  # checked before anything is written
    with pytest.raises(RuntimeError, match="qkv must be"):
        rotary_kv_write(torch.randn(2, 30), cos, sin, kv, torch.tensor([0, 1]), 2)


@needs_cpp
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("N,I", [(1, 1536), (7, 33), (40, 100)])
def test_silu_and_mul_matches_twin(N, I, dtype, isa_kernels):
    """Different exp implementations: float32 within a few ulp, bf16 within one step (rarely off at all)."""
    from r1serve.kernels.silu_and_mul import silu_and_mul, silu_and_mul_reference

    x = (torch.randn(N, 2 * I) * 4).to(dtype)
    tol = 1e-6 if dtype == torch.float32 else 2 ** -7
    torch.testing.assert_close(silu_and_mul(x, isa_kernels), silu_and_mul_reference(x), rtol=tol, atol=tol)
    with pytest.raises(RuntimeError, match="silu_and_mul"):
        silu_and_mul(torch.randn(3, 7), isa_kernels)


@needs_cpp
@pytest.mark.parametrize("V", [1, 7, 16, 33, 49152])
def test_argmax_rows_matches_torch_ties_nans_and_infs_included(V, isa_kernels):
    from r1serve.kernels.argmax_rows import argmax_rows, argmax_rows_reference

    g = torch.Generator().manual_seed(V)
    x = torch.randn(9, V, generator=g)
    x[1] = 0.5  # all tied: the first index
    x[2] = float("-inf")  # nothing finite: index 0
    if V > 3:
        x[3, V // 2] = x[3, V - 1] = 1e9  # a tie between a vector lane and a later one
        x[4, V - 1] = float("nan")  # NaN wins, even in the tail
        x[5, 2] = x[5, V - 2] = float("nan")  # the first NaN
        x[6, V - 1] = float("inf")
        x[7, :] = torch.randint(0, 3, (V,), generator=g).float()  # many ties at the maximum
    got = argmax_rows(x, isa_kernels)
    assert got.dtype == torch.int64 and torch.equal(got, argmax_rows_reference(x))


def test_argmax_rows_falls_back_to_torch_for_other_inputs():
    from r1serve.kernels.argmax_rows import argmax_rows

    x = torch.randn(4, 40).bfloat16()
    assert torch.equal(argmax_rows(x), x.argmax(dim=-1))
    t = torch.randn(40, 4).t()  # not contiguous
    assert torch.equal(argmax_rows(t), t.argmax(dim=-1))
