"""Weights kept quantized, in the packed formats the CPU's quantized GEMM streams
(csrc/quant_formats.h draws the layouts; csrc/quant_gemm.h is the kernel).

A GGUF file's blocks are repacked as they are read (`repack_gguf`, csrc/gguf_repack.h), in
C++, row blocks in parallel, with no float copy of the weight on the way; float weights are
quantized once at load (`quantize_weight`). Four formats cover every block type:

    G4  int4 codes, fp16 scale and min per 32 columns       Q4_0, Q4_1, int4     5.0 bits
    G8  int8 codes, fp16 scale and min per 32 columns       Q8_0, Q5_0, Q5_1, int8   9.0
    K4  int4 codes, two-level scales per 256 columns        Q4_K                 4.6
    K8  int8 codes, two-level scales per 256, halves of 16  Q5_K, Q6_K, Q3_K, Q2_K   9.1

The K formats keep a K-quant's own super-block scales (d, dmin per row) and small scales (sc,
m per group), so the weight is exactly the file's: `dequantize` gives gguf-py's values bit
for bit. A weight may be several segments of output rows in different formats (a fused
q/k/v projection whose v was stored in Q6_K and q, k in Q4_K); one kernel call serves them.

Twins: `dequantize` (the weight a packed one stands for) and `quant_linear_reference` (the
kernel's arithmetic in plain torch: activations rounded to int8 per 32 values, exact integer
dot products, float scales).
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from r1serve.kernels.quant_formats import GGML_FORMATS, GROUP, ROWS, BlockTensor, Format

@dataclass(frozen=True)
class QuantizedWeight:
    packed: torch.Tensor  # 1-D uint8: each segment's 16-row blocks, one after the other
    segments: torch.Tensor  # (S, 4) int64: format, first output row, rows, byte offset in packed
    out_features: int  # N
    in_features: int  # K

    def __post_init__(self) -> None:
        # Checked once here rather than on every call (the C++ checks the table again).
        assert self.packed.dtype == torch.uint8 and self.packed.dim() == 1 and self.packed.is_contiguous()
        assert self.segments.dtype == torch.int64 and self.segments.shape[1:] == (4,)
        end = 0
        for fmt, row0, rows, offset in self.segments.tolist():
            assert offset == end and row0 + rows <= self.out_features, (self.segments, self.out_features)
            end += -(-rows // ROWS) * Format(fmt).block_bytes(self.in_features)
        assert end == self.packed.numel(), (end, self.packed.numel())

    @classmethod
    def single(cls, packed: torch.Tensor, fmt: Format, N: int, K: int) -> QuantizedWeight:
        return cls(packed, torch.tensor([[int(fmt), 0, N, 0]]), N, K)

    @property
    def formats(self) -> list[Format]:
        return [Format(f) for f in self.segments[:, 0].tolist()]

    @property
    def nbytes(self) -> int:
        return self.packed.numel()


# ---- packing (C++) ---------------------------------------------------------------------------


def pack_parts(parts: list[BlockTensor | torch.Tensor], kernels, bits: int = 8) -> QuantizedWeight:
    """Weights stacked along their rows (q, k and v into one projection), each packed from a
    checkpoint's blocks (a BlockTensor: exactly, in its GGML_FORMATS form) or quantized from
    floats (a (rows, K) tensor: into int4 or int8 groups, `bits`), into one buffer allocated
    once: no part is ever copied twice."""
    K = parts[0].shape[1]
    assert all(p.shape[1] == K for p in parts), [p.shape for p in parts]
    table, offset, row = [], 0, 0
    for p in parts:
        fmt = GGML_FORMATS[p.ggml_type] if isinstance(p, BlockTensor) else Format.G4 if bits == 4 else Format.G8
        table.append([int(fmt), row, p.shape[0], offset])
        offset, row = offset + -(-p.shape[0] // ROWS) * fmt.block_bytes(K), row + p.shape[0]
    packed = torch.empty(offset, dtype=torch.uint8)  # the kernels write every byte
    ends = [t[3] for t in table[1:]] + [offset]
    for p, (_, _, _, start), end in zip(parts, table, ends):
        if isinstance(p, BlockTensor):
            kernels.repack_gguf(p.raw, p.ggml_type, packed[start:end])
        else:
            kernels.quantize_weight(p.contiguous(), bits, packed[start:end])
    return QuantizedWeight(packed, torch.tensor(table, dtype=torch.int64), row, K)


def repack_gguf(blocks: BlockTensor, kernels) -> QuantizedWeight:
    """A checkpoint matrix's blocks in their packed form (GGML_FORMATS), exactly."""
    return pack_parts([blocks], kernels)


def quantize_weight(weight: torch.Tensor, bits: int, kernels) -> QuantizedWeight:
    # weight: (N, K) float32 or bf16 -> G4 (bits 4) or G8 (bits 8), as quantize_weight_reference
    return pack_parts([weight], kernels, bits)


def quant_linear(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None, kernels) -> torch.Tensor:
    # x: (M, K) float32 or bf16 -> (M, N) of x's dtype; the C++ checks its arguments again
    assert x.dim() == 2 and x.shape[1] == w.in_features and x.dtype in (torch.float32, torch.bfloat16), (x.shape, x.dtype)
    return kernels.quant_linear(x.contiguous(), w.packed, w.segments, w.out_features, bias)


def dequantize_rows(w: QuantizedWeight, ids: torch.Tensor, kernels) -> torch.Tensor:
    # ids: int64 row indices -> (ids.numel(), K) float32: an embedding looked up in its table
    return kernels.dequantize_rows(w.packed, w.segments, w.out_features, w.in_features, ids)


# ---- twins (plain torch) ---------------------------------------------------------------------


def quantize_weight_reference(weight: torch.Tensor, bits: int) -> QuantizedWeight:
    """quantize_weight in plain torch: the same bytes (csrc/quant_weight.h's rule)."""
    N, K = weight.shape
    G = -(-K // GROUP)
    w = weight.float()
    if G * GROUP != K:  # pad with the row's last value: inside the last group's range
        w = torch.cat([w, w[:, -1:].expand(N, G * GROUP - K)], dim=1)
    w = w.view(N, G, GROUP)
    if bits == 4:
        lo, hi = w.amin(-1), w.amax(-1)
        scale, mn = ((hi - lo) / 15).half(), lo.half()
    else:
        scale = (w.abs().amax(-1) / 127).half()
        mn = scale * -128  # exact in fp16: a power of two
    assert torch.isfinite(scale).all(), "weights out of float16 range: int groups cannot hold them"
    s, m = scale.float()[..., None], mn.float()[..., None]
    codes = torch.where(s > 0, (w - m) / torch.where(s > 0, s, 1), 0).round()
    codes = codes.clamp(0, 15) if bits == 4 else torch.where(s > 0, codes.clamp(1, 255), 128)
    packed = _pack_g(codes.to(torch.uint8).view(N, G * GROUP), scale, mn, bits)
    return QuantizedWeight.single(packed, Format.G4 if bits == 4 else Format.G8, N, K)


def _pack_g(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int) -> torch.Tensor:
    # codes: (N, G*32) uint8; scale, mn: (N, G) fp16 -> G4/G8 row blocks, 1-D uint8
    N, G = scale.shape
    NB = -(-N // ROWS)
    pad = NB * ROWS - N  # padding rows: code = scale = min = 0
    codes, scale, mn = (F.pad(t, (0, 0, 0, pad)) for t in (codes, scale, mn))
    if bits == 4:  # column 8c + 4h + j -> chunk c, byte 4r + j, nibble h (0 low, 1 high)
        t = codes.view(NB, ROWS, G, 4, 2, 4).permute(0, 2, 3, 1, 5, 4)  # (NB, G, c, r, j, h)
        code_bytes = (t[..., 0] | (t[..., 1] << 4)).reshape(NB, G, 256)
    else:  # column 4c + j -> chunk c, byte 4r + j
        code_bytes = codes.view(NB, ROWS, G, 8, 4).permute(0, 2, 3, 1, 4).reshape(NB, G, 512)
    halves = [v.view(NB, ROWS, G).transpose(1, 2).contiguous().view(torch.uint8) for v in (scale, mn)]  # (NB, G, 32)
    return torch.cat([code_bytes, *halves], dim=2).reshape(-1)


def _unpack_codes(tiles: torch.Tensor, bits: int) -> torch.Tensor:
    # tiles: (NB, G, code bytes) uint8 -> codes (NB * 16, G * 32) uint8
    NB, G, _ = tiles.shape
    if bits == 4:
        nibbles = tiles.reshape(NB, G, 4, ROWS, 4)  # (NB, G, c, r, j)
        t = torch.stack([nibbles & 0x0F, nibbles >> 4], dim=-1)  # (NB, G, c, r, j, h)
        codes = t.permute(0, 3, 1, 2, 5, 4)  # (NB, r, G, c, h, j)
    else:
        codes = tiles.reshape(NB, G, 8, ROWS, 4).permute(0, 3, 1, 2, 4)  # (NB, r, G, c, j)
    return codes.reshape(NB * ROWS, G * GROUP)


def _halves_f16(b: torch.Tensor) -> torch.Tensor:
    # (NB, G, 32) bytes of 16 fp16 per row block -> (NB * 16, G) float32
    NB, G, _ = b.shape
    return b.contiguous().view(torch.float16).float().transpose(1, 2).reshape(NB * ROWS, G)


def unpack(w: QuantizedWeight, segment: int = 0) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """One segment's codes u (rows, Gp*32) uint8 and per-(row, scale group) scale and min,
    float32 (rows, Gp, halves), with w = scale * u + min; exact (d * sc and dmin * m are
    exact in float32). Gp counts whole units (padding columns past K included)."""
    fmt_id, _, rows, offset = w.segments[segment].tolist()
    fmt, K = Format(fmt_id), w.in_features
    NB, units = -(-rows // ROWS), -(-K // fmt.unit_cols)
    data = w.packed[offset:offset + NB * fmt.block_bytes(K)].view(NB, units, fmt.unit_bytes)
    code_bytes = ROWS * GROUP * fmt.bits // 8
    if not fmt.two_level:
        tiles = data.view(NB, units, fmt.tile_bytes)
        scale, mn = (_halves_f16(tiles[..., code_bytes + 32 * i:code_bytes + 32 * (i + 1)]) for i in (0, 1))
        codes = _unpack_codes(tiles[..., :code_bytes], fmt.bits)
        return codes[:rows], scale[:rows, :, None], mn[:rows, :, None]
    H = fmt.halves
    d, dmin = (_halves_f16(data[..., 32 * i:32 * (i + 1)]) for i in (0, 1))  # (rows, units)
    tiles = data[..., 4 * ROWS:].reshape(NB, units * 8, fmt.tile_bytes)
    small = tiles[..., code_bytes:].contiguous().view(torch.int8).view(NB, units * 8, 2, H, ROWS)  # (NB, G, sc|m, h, r)
    small = small.permute(0, 4, 1, 2, 3).reshape(NB * ROWS, units * 8, 2, H).float()
    per_group = lambda t: t.repeat_interleave(8, dim=1)[..., None]  # (rows, G, 1)
    scale = per_group(d) * small[..., 0, :]
    mn = -per_group(dmin) * small[..., 1, :]
    codes = _unpack_codes(tiles[..., :code_bytes], fmt.bits)
    return codes[:rows], scale[:rows], mn[:rows]


def dequantize(w: QuantizedWeight) -> torch.Tensor:
    """(N, K) float32: the weight a packed one stands for, rounded once from the exact value
    (scale * u + min in float64): gguf-py's dequantize of the same blocks, bit for bit."""
    out = torch.zeros(w.out_features, w.in_features)
    for i, (_, row0, rows, _) in enumerate(w.segments.tolist()):
        codes, scale, mn = unpack(w, i)
        G, H = scale.shape[1], scale.shape[2]
        u = codes.double().view(rows, G, H, GROUP // H)
        dense = u * scale.double()[..., None] + mn.double()[..., None]
        out[row0:row0 + rows] = dense.view(rows, G * GROUP)[:, :w.in_features].float()
    return out


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    # x: (M, K) -> a (M, G, 32) integer-valued float32 in -127..127, dx (M, G), sx = dx * sum(a)
    # (M, G), sh = dx * sum over each half of 16 (M, G, 2)
    M, K = x.shape
    G = -(-K // GROUP)
    xf = F.pad(x.float(), (0, G * GROUP - K)).view(M, G, GROUP)
    amax = xf.abs().amax(-1)
    dx = amax / 127
    # A tensor divided by a tensor: `127 / amax` would multiply by amax's reciprocal, rounding
    # twice, and the kernel's float division rounds once (ties to even then differ).
    inv = torch.where(amax > 0, torch.full_like(amax, 127) / torch.where(amax > 0, amax, 1), 0)
    a = torch.round(xf * inv[..., None])
    return a, dx, dx * a.sum(-1), dx[..., None] * a.view(M, G, 2, 16).sum(-1)


def quant_linear_reference(x: torch.Tensor, w: QuantizedWeight, bias: torch.Tensor | None) -> torch.Tensor:
    # The kernel's arithmetic: per scale group, (scale * dx) * sum(u * a) + min * (dx * sum(a)).
    a, dx, sx, sh = quantize_activations(x)  # (M, G, 32), (M, G), (M, G), (M, G, 2)
    M, G = dx.shape
    y = torch.zeros(M, w.out_features)
    for i, (_, row0, rows, _) in enumerate(w.segments.tolist()):
        codes, scale, mn = unpack(w, i)  # (rows, Gp*32), (rows, Gp, H)
        H = scale.shape[2]
        u = codes.float()[:, :G * GROUP].view(rows, G, H, GROUP // H)
        dots = torch.einsum("mghk,nghk->mngh", a.view(M, G, H, GROUP // H), u)  # exact: |dot| < 2^24
        sums = sx[..., None] if H == 1 else sh  # (M, G, H)
        part = (dots * (scale[None, :, :G] * dx[:, None, :, None])).sum((-1, -2))
        y[:, row0:row0 + rows] = part + (mn[None, :, :G] * sums[:, None]).sum((-1, -2))
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)
