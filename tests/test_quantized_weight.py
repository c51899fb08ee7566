"""Quantized weights on the CPU: GGUF blocks repacked exactly, the quantized GEMM against its
twin in every format and at every batch size, and the platform's plan for which modules
take the checkpoint's own blocks."""
from __future__ import annotations

import gguf
import numpy as np
import pytest
import torch
from gguf import GGMLQuantizationType as Q
from torch import nn

from kquant_encoder import quantize as encode
from r1serve.config import EngineConfig
from r1serve.errors import InvalidRequestError
from r1serve.kernels.cpu_extension import cpu_kernels
from r1serve.kernels.quantized_weight import (GGML_FORMATS, BlockTensor, Format, QuantizedWeight, dequantize,
                                              dequantize_rows, pack_parts, quant_linear, quant_linear_reference,
                                              quantize_activations, quantize_weight, quantize_weight_reference,
                                              repack_gguf, unpack)

needs_kernel = pytest.mark.skipif(cpu_kernels() is None, reason="no C++ compiler: the CPU kernels are not built")
BLOCK_TYPES = [Q.Q4_0, Q.Q4_1, Q.Q5_0, Q.Q5_1, Q.Q8_0, Q.Q2_K, Q.Q3_K, Q.Q4_K, Q.Q5_K, Q.Q6_K]
# Byte offsets of each block type's float16 scales (random bits there give inf and nan).
SCALE_OFFSETS = {Q.Q4_0: [0], Q.Q4_1: [0, 2], Q.Q5_0: [0], Q.Q5_1: [0, 2], Q.Q8_0: [0], Q.Q2_K: [80, 82],
                 Q.Q3_K: [108], Q.Q4_K: [0, 2], Q.Q5_K: [0, 2], Q.Q6_K: [208]}


def blocks_of(kind: Q, N: int, K: int, source: str = "encoded", seed: int = 0) -> BlockTensor:
    """(N, K) weights in `kind`: encoded from Gaussian floats, or random bytes (every bit
    pattern the format can hold, float16 scales of either sign kept finite)."""
    rng = np.random.default_rng(seed)
    if source == "encoded":
        raw = encode((rng.standard_normal((N, K)) * 0.05).astype(np.float32), kind)
    else:
        block, nbytes = gguf.GGML_QUANT_SIZES[kind]
        raw = rng.integers(0, 256, size=(N * K // block, nbytes), dtype=np.uint8)
        for at in SCALE_OFFSETS[kind]:
            raw[:, at:at + 2] = rng.uniform(-0.05, 0.05, size=len(raw)).astype(np.float16).view(np.uint8).reshape(-1, 2)
        raw = raw.reshape(N, -1)
    return BlockTensor(torch.from_numpy(np.ascontiguousarray(raw)), int(kind), (N, K))


def gguf_floats(b: BlockTensor) -> torch.Tensor:
    return torch.from_numpy(gguf.quants.dequantize(b.raw.numpy(), Q(b.ggml_type)).astype(np.float32))


# ---- GGUF blocks, repacked -------------------------------------------------------------------------


@needs_kernel
@pytest.mark.parametrize("source", ["encoded", "random bytes"])
@pytest.mark.parametrize("kind", BLOCK_TYPES, ids=lambda k: k.name)
def test_repacked_blocks_are_the_files_weights_bit_for_bit(kind, source):
    """Every block type's packed form stands for exactly the weights gguf-py's dequantize
    reads from the same bytes (37 rows: a part-filled last row block)."""
    b = blocks_of(kind, 37, 512, source)
    w = repack_gguf(b, cpu_kernels())
    assert w.formats == [GGML_FORMATS[int(kind)]] and (w.out_features, w.in_features) == (37, 512)
    want = gguf_floats(b)
    assert torch.equal(dequantize(w), want)
    ids = torch.tensor([0, 36, 5, 16, 15, 5])
    assert torch.equal(dequantize_rows(w, ids, cpu_kernels()), want[ids])  # the embedding's lookup


@needs_kernel
def test_packed_bytes_per_weight():
    """What each format costs against the file's own bits (Q4_K 4.5, Q6_K 6.56, Q4_0 4.5)."""
    bits = {kind: repack_gguf(blocks_of(kind, 64, 512), cpu_kernels()).nbytes * 8 / (64 * 512)
            for kind in (Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K)}
    assert bits == {Q.Q4_0: 5.0, Q.Q4_1: 5.0, Q.Q8_0: 9.0, Q.Q4_K: 4.625, Q.Q6_K: 9.125}


@needs_kernel
def test_fused_parts_of_different_formats_are_one_weight():
    """q and k in Q4_K, v in Q6_K, and a float part: one packed weight of four segments whose
    GEMM is the parts' GEMMs side by side."""
    k = cpu_kernels()
    parts = [blocks_of(Q.Q4_K, 48, 256, seed=1), blocks_of(Q.Q4_K, 16, 256, seed=2), blocks_of(Q.Q6_K, 16, 256, seed=3),
             torch.randn(7, 256) * 0.05]
    fused = pack_parts(parts, k, bits=8)
    assert fused.formats == [Format.K4, Format.K4, Format.K8, Format.G8] and fused.out_features == 87
    alone = [pack_parts([p], k, bits=8) for p in parts]
    assert torch.equal(dequantize(fused), torch.cat([dequantize(w) for w in alone]))
    x = torch.randn(5, 256)
    assert torch.equal(quant_linear(x, fused, None, k), torch.cat([quant_linear(x, w, None, k) for w in alone], 1))


# ---- float weights, quantized at load ------------------------------------------------------------

SHAPES = [(37, 80), (5, 7), (16, 32), (96, 576), (33, 1000)]  # odd N and K: padded rows and columns


@needs_kernel
@pytest.mark.parametrize("bits", [4, 8])
@pytest.mark.parametrize("N,K", SHAPES)
def test_quantize_weight_is_its_twin_and_within_half_a_step(bits, N, K):
    torch.manual_seed(0)
    w = torch.randn(N, K).bfloat16()
    got = quantize_weight(w, bits, cpu_kernels())
    assert torch.equal(got.packed, quantize_weight_reference(w, bits).packed)
    assert torch.equal(quantize_weight(w.float(), bits, cpu_kernels()).packed, got.packed)  # bf16 values: same grid
    codes, scale, _ = unpack(got)
    assert codes.max() <= (15 if bits == 4 else 255)
    step = scale[..., 0].repeat_interleave(32, dim=1)[:, :K]
    err = (dequantize(got) - w.float()).abs()
    assert (err <= step * 0.5 + 2e-3 * w.float().abs() + 1e-6).all()  # plus the fp16 rounding of min


@needs_kernel
@pytest.mark.parametrize("kind,bits", [(Q.Q4_1, 4), (Q.Q8_0, 8)])
def test_blocks_requantized_from_bf16_come_back(kind, bits):
    """A Q4_1 (Q8_0) file's weights widened to bf16 and quantized again (a GGUF dequantized by
    another tool) fall on their own grid: within two bf16 roundings of the group's largest."""
    exact = gguf_floats(blocks_of(kind, 64, 256))
    err = (dequantize(quantize_weight(exact.bfloat16(), bits, cpu_kernels())) - exact).abs().view(64, 8, 32)
    group_max = exact.abs().view(64, 8, 32).amax(-1, keepdim=True)
    assert (err <= group_max * 2 ** -7).all(), (err / group_max).max()


# ---- the GEMM -------------------------------------------------------------------------------------

# A weight in each format: (block type, or None for int4/int8 from floats, N, K)
FORMAT_WEIGHTS = {"G4 (Q4_1)": (Q.Q4_1, 40, 96), "G4 (int4, K padded)": (4, 33, 70), "G8 (Q8_0)": (Q.Q8_0, 45, 64),
                  "G8 (Q5_0)": (Q.Q5_0, 17, 2304), "K4 (Q4_K)": (Q.Q4_K, 40, 512), "K8 (Q6_K)": (Q.Q6_K, 20, 2304),
                  "K8 (Q5_K)": (Q.Q5_K, 24, 256), "K8 (Q3_K)": (Q.Q3_K, 16, 256), "K8 (Q2_K)": (Q.Q2_K, 16, 256)}


def weight_for(case: str, kernels) -> QuantizedWeight:
    kind, N, K = FORMAT_WEIGHTS[case]
    if kind in (4, 8):
        return quantize_weight(torch.randn(N, K) * 0.05, kind, kernels)
    return repack_gguf(blocks_of(kind, N, K), kernels)


# Rows: all registers in one pass (1-3), one register a pass with tails (7, 19, 64), and a
# prefill of 512 rows in chunks (the K = 2304 weights: chunks of 112 rows).
CASES = [(case, rows) for case in FORMAT_WEIGHTS for rows in (1, 2, 3, 7, 19, 64)]
CASES += [(case, 512) for case, (_, _, K) in FORMAT_WEIGHTS.items() if K == 2304]


@pytest.mark.parametrize("case,rows", CASES)
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_kernel_matches_twin(case, rows, dtype, isa_kernels):
    """Kernel and twin do the same integer dot products and differ only in the order of the
    float sums: bf16 outputs agree to one rounding step (2^-8 relative), float32 ones to
    float32 sums' rounding, relative to the terms summed (Q2_K's mins cancel most of its
    scaled dots: 1e-4 of the largest output)."""
    torch.manual_seed(rows)
    w = weight_for(case, isa_kernels)
    x, bias = torch.randn(rows, w.in_features).to(dtype), torch.randn(w.out_features).to(dtype)
    tol = 2 ** -7 if dtype == torch.bfloat16 else 1e-4
    for b in (None, bias):
        got = quant_linear(x, w, b, isa_kernels)
        expected = quant_linear_reference(x, w, b)
        assert got.shape == (rows, w.out_features) and got.dtype == dtype
        torch.testing.assert_close(got.float(), expected.float(), rtol=tol, atol=tol * expected.abs().max().item())


def test_activation_quantization_is_q8_1():
    x = torch.tensor([[0.0] * 32 + [1.0, -2.0, 0.5] + [0.0] * 29]).bfloat16()
    a, dx, sx, sh = quantize_activations(x)
    assert dx[0, 0] == 0 and (a[0, 0] == 0).all()  # an all-zero group
    assert a[0, 1, :3].tolist() == [64.0, -127.0, 32.0] and dx[0, 1] == pytest.approx(2 / 127)  # 63.5 -> 64 (even)
    assert sx[0, 1] == pytest.approx(dx[0, 1] * (64 - 127 + 32))
    assert sh[0, 1].tolist() == pytest.approx([(dx[0, 1] * (64 - 127 + 32)).item(), 0.0])  # per half of 16


def test_activation_scale_is_one_division_as_in_the_kernel():
    """127 / amax rounded once: `127 / t` in torch multiplies by t's reciprocal and rounds
    twice, and where x * (127 / amax) lands on .5 the two round apart (a 1e-3 error in one
    of every few thousand rows, found by a 24-row prefill)."""
    amax = float.fromhex("0x1.08a8c2p+1")
    x = torch.tensor([[float.fromhex("0x1.9a88cep+0"), -amax] + [0.0] * 30])
    a, _, _, _ = quantize_activations(x)
    assert a[0, 0, :2].tolist() == [99.0, -127.0]  # 98.5000076: the kernel's rounding


@pytest.mark.parametrize("case", ["G4 (Q4_1)", "K4 (Q4_K)", "K8 (Q6_K)"])
def test_twin_error_is_the_activation_rounding(case):
    """Against a float matmul with the same weights, the only error is rounding x to int8
    per group: |y - y_float| <= |W| @ (dx / 2), plus the bf16 rounding of y."""
    if cpu_kernels() is None:
        pytest.skip("the weights are packed by the C++ kernels")
    torch.manual_seed(0)
    w = weight_for(case, cpu_kernels())
    K = w.in_features
    x = (torch.randn(3, K) * torch.rand(3, K) * 4).bfloat16()
    dense = dequantize(w)
    exact = x.float() @ dense.T
    _, dx, _, _ = quantize_activations(x)
    half_step = (dx / 2).repeat_interleave(32, dim=1)[:, :K]  # (3, K)
    bound = half_step @ dense.abs().T + exact.abs() * 2 ** -8 + 1e-4
    assert ((quant_linear_reference(x, w, None).float() - exact).abs() <= bound).all()


@needs_kernel
def test_bad_inputs_are_refused():
    k = cpu_kernels()
    w = quantize_weight(torch.randn(20, 64), 4, k)
    with pytest.raises(AssertionError):
        quant_linear(torch.randn(1, 63), w, None, k)  # wrong K
    with pytest.raises(AssertionError):
        quant_linear(torch.randn(1, 64).half(), w, None, k)  # float16 activations
    with pytest.raises(RuntimeError, match="segment 0"):
        k.quant_linear(torch.randn(1, 64), w.packed, torch.tensor([[0, 0, 20, 8]]), 20, None)  # past the bytes
    with pytest.raises(RuntimeError, match="multiple of 256"):
        k.quant_linear(torch.randn(1, 64), w.packed, torch.tensor([[2, 0, 1, 0]]), 1, None)  # K4 needs K % 256 == 0
    with pytest.raises(RuntimeError, match="bits must be 4 or 8"):
        k.quantize_weight(torch.randn(4, 32), 5, torch.zeros(1, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="no packed form"):
        k.repack_gguf(torch.zeros(1, 32, dtype=torch.uint8), int(Q.IQ4_NL), torch.zeros(1, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="not whole blocks"):
        k.repack_gguf(torch.zeros(1, 100, dtype=torch.uint8), int(Q.Q4_K), torch.zeros(1, dtype=torch.uint8))
    with pytest.raises(RuntimeError, match="float16 range"):
        quantize_weight(torch.tensor([[1e7] + [0.0] * 31]), 8, k)


def test_config_refuses_unknown_mode():
    with pytest.raises(InvalidRequestError, match="quantization='int3'"):
        EngineConfig(model="m", cache_dir=".", quantization="int3")
