"""Weight-only GEMM on the CPU with weights in int4 or int8 groups of 32 (csrc/group_quant_gemm.h,
over the vector layer: VNNI, AVX2, NEON dot products).

Decoding one or a few sequences streams every weight once per token. Stored as integer
codes in groups of 32 with a float16 scale and minimum per group, the weights take
4.5 bits each in int4 (GGUF Q4_1's form) and 8.5 in int8 (Q8_0's form). A checkpoint
stored in those forms maps onto them exactly: its bf16 weights are `scale * code + min`
to bf16 rounding, and quantizing them again recovers the codes. For others it is a lossy
choice (at most half a step of the group's levels).

    int4: code = round((w - min) / scale) in 0..15, scale = (max - min) / 15
    int8: code = round(w / scale) + 128 in 1..255, scale = max|w| / 127, min = -128 scale

The kernel quantizes the activations to int8 per group of 32 (llama.cpp's Q8_1) so that
its inner loop is integer dot products; the twin, `group_quant_linear_reference`, does
the same arithmetic in plain torch, and `dequantize_groups` gives the float weight.

    packed (NB, G, T) uint8, NB = ceil(N / 16), G = ceil(K / 32), T = 320 (int4) or 576
    (int8): one tile per 16 rows x 32 columns; the byte layout is drawn in csrc/group_quant_gemm.h.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F

from r1serve.kernels.cpu_extension import cpu_kernels

GROUP, ROWS = 32, 16
TILE_BYTES = {4: 320, 8: 576}  # codes, then 16 fp16 scales and 16 fp16 mins


@dataclass(frozen=True)
class GroupQuantWeight:
    packed: torch.Tensor  # (NB, G, TILE_BYTES[bits]) uint8
    out_features: int  # N
    in_features: int  # K
    bits: int  # 4 or 8

    def __post_init__(self) -> None:
        # Checked once here rather than on every call: the GEMM itself takes only ~10 us.
        NB, G = -(-self.out_features // ROWS), -(-self.in_features // GROUP)
        assert self.bits in TILE_BYTES, f"bits={self.bits} must be 4 or 8"
        assert self.packed.shape == (NB, G, TILE_BYTES[self.bits]), (self.packed.shape, self.out_features, self.in_features)
        assert self.packed.dtype == torch.uint8 and self.packed.is_contiguous()


def quantize_groups(weight: torch.Tensor, bits: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # weight: (N, K) -> codes (N, G*32) uint8, scale (N, G) fp16, min (N, G) fp16
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
    # Codes are chosen against the stored (float16) scale and minimum, not the exact ones.
    s, m = scale.float()[..., None], mn.float()[..., None]
    codes = torch.where(s > 0, (w - m) / torch.where(s > 0, s, 1), 0).round()
    codes = codes.clamp(0, 15) if bits == 4 else torch.where(s > 0, codes.clamp(1, 255), 128)
    return codes.to(torch.uint8).view(N, G * GROUP), scale, mn


def pack_groups(codes: torch.Tensor, scale: torch.Tensor, mn: torch.Tensor, bits: int) -> torch.Tensor:
    # codes: (N, G*32) uint8; scale, mn: (N, G) fp16 -> (NB, G, TILE_BYTES[bits]) uint8
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
    return torch.cat([code_bytes, *halves], dim=2).contiguous()


def unpack_groups(w: GroupQuantWeight) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # -> codes (N, G*32) uint8, scale (N, G) fp16, min (N, G) fp16: pack_groups' inverse
    NB, G, T = w.packed.shape
    if w.bits == 4:
        nibbles = w.packed[..., :256].reshape(NB, G, 4, ROWS, 4)  # (NB, G, c, r, j)
        t = torch.stack([nibbles & 0x0F, nibbles >> 4], dim=-1)  # (NB, G, c, r, j, h)
        codes = t.permute(0, 3, 1, 2, 5, 4)
    else:
        codes = w.packed[..., :512].reshape(NB, G, 8, ROWS, 4).permute(0, 3, 1, 2, 4)  # (NB, r, G, c, j)
    codes = codes.reshape(NB * ROWS, G * GROUP)[:w.out_features]
    scale, mn = (w.packed[..., lo:lo + 32].contiguous().view(torch.float16).transpose(1, 2).reshape(NB * ROWS, G)
                 for lo in (T - 64, T - 32))
    return codes, scale[:w.out_features], mn[:w.out_features]


def to_group_quant(weight: torch.Tensor, bits: int, chunk_rows: int = 4096) -> GroupQuantWeight:
    # A few thousand rows at a time (a multiple of 16, so only the last chunk pads): the
    # float32 temporaries of a whole 49152-row embedding would add ~0.5 GB to peak memory.
    N, K = weight.shape
    parts = [pack_groups(*quantize_groups(weight[i:i + chunk_rows], bits), bits) for i in range(0, N, chunk_rows)]
    return GroupQuantWeight(torch.cat(parts), N, K, bits)


def dequantize_groups(w: GroupQuantWeight) -> torch.Tensor:
    # -> (N, K) float32, the weight the packed tiles stand for
    codes, scale, mn = unpack_groups(w)
    G = scale.shape[1]
    dense = codes.float().view(-1, G, GROUP) * scale.float()[..., None] + mn.float()[..., None]
    return dense.view(w.out_features, G * GROUP)[:, :w.in_features]


# Row 0's code bytes in a tile, in column order (a row r's are 4 r further on): int8,
# column 4c + j at byte 64c + j; int4, columns 8c + j and 8c + 4 + j at byte 64c + j.
_ROW0_CODE_BYTES = {8: (64 * torch.arange(8)[:, None] + torch.arange(4)).view(1, 1, 32),
                    4: (64 * torch.arange(4)[:, None] + torch.arange(4)).view(1, 1, 16)}


def dequantize_rows(w: GroupQuantWeight, ids: torch.Tensor) -> torch.Tensor:
    # ids: (M,) int64 row indices -> (M, K) float32, those rows of dequantize_groups(w): an
    # embedding looked up in its tied LM head's groups.
    NB, G, T = w.packed.shape
    tiles, r = w.packed[ids // ROWS], (ids % ROWS)[:, None, None]  # (M, G, T), (M, 1, 1)
    M = ids.shape[0]
    at = _ROW0_CODE_BYTES[w.bits] + 4 * r  # (M, 1, 32 or 16)
    if w.bits == 8:
        codes = tiles.gather(2, at.expand(M, G, 32))
    else:  # low nibbles first, then high: columns 8c + 4h + j
        b = tiles.gather(2, at.expand(M, G, 16)).view(M, G, 4, 1, 4)
        codes = torch.cat([b & 0x0F, b >> 4], dim=3).view(M, G, 32)
    scale, mn = (tiles[..., lo:lo + 32].contiguous().view(torch.float16).gather(2, r.expand(M, G, 1)).float()
                 for lo in (T - 64, T - 32))  # (M, G, 1)
    return (codes.float() * scale + mn).view(M, G * GROUP)[:, :w.in_features]


def quantize_activations(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    # x: (M, K) -> a (M, G, 32) integer-valued float32 in -127..127, dx (M, G), sx = dx * sum(a) (M, G)
    M, K = x.shape
    G = -(-K // GROUP)
    xf = F.pad(x.float(), (0, G * GROUP - K)).view(M, G, GROUP)
    amax = xf.abs().amax(-1)
    dx = amax / 127
    inv = torch.where(amax > 0, 127 / torch.where(amax > 0, amax, 1), 0)
    a = torch.round(xf * inv[..., None])
    return a, dx, dx * a.sum(-1)


def group_quant_linear_reference(x: torch.Tensor, w: GroupQuantWeight, bias: torch.Tensor | None) -> torch.Tensor:
    # The kernel's arithmetic: per group, (scale * dx) * sum(code * a) + min * sx, summed over groups.
    a, dx, sx = quantize_activations(x)  # (M, G, 32), (M, G), (M, G)
    codes, scale, mn = unpack_groups(w)
    G = scale.shape[1]
    dots = torch.einsum("mgk,ngk->mng", a, codes.float().view(-1, G, GROUP))  # exact: |dot| < 2^24
    y = (dots * (scale.float()[None] * dx[:, None, :])).sum(-1) + (mn.float()[None] * sx[:, None, :]).sum(-1)
    if bias is not None:
        y = y + bias.float()
    return y.to(x.dtype)


def group_quant_kernel_available() -> bool:
    """Built for every CPU (csrc/vec.h), where a compiler is."""
    return cpu_kernels() is not None


def group_quant_linear(x: torch.Tensor, w: GroupQuantWeight, bias: torch.Tensor | None, kernels=None) -> torch.Tensor:
    # x: (M, K) float32 or bf16 -> (M, N) of x's dtype. w was checked when built; the C++
    # checks x and bias again. kernels: the compiled module of one ISA (default: the best).
    assert x.dim() == 2 and x.shape[1] == w.in_features and x.dtype in (torch.float32, torch.bfloat16), (x.shape, x.dtype)
    return (kernels or cpu_kernels()).group_quant_linear(x, w.packed, w.out_features, w.bits, bias)
