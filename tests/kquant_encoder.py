"""A numpy encoder for ggml's K-quants (Q2_K .. Q6_K), which gguf-py can decode but not write.

Each function turns float weights (rows, K), K a multiple of 256, into rows of ggml blocks
in the bit layout ggml-quants.c's dequantize_row_* reads (the one gguf-py's dequantize
reads too): scales chosen simply (each sub-block's range, its scale rounded to the
super-block's grid), not llama-quantize's search. Good enough to make model files whose
weights resemble their float originals; the tests compare r1serve's unpacking with gguf-py's
on the same bytes, which holds for any bytes.
"""
from __future__ import annotations

import numpy as np
from gguf import GGMLQuantizationType as Q

QK = 256


def _f16(x: np.ndarray) -> np.ndarray:
    return x.astype(np.float16)


def _div(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    with np.errstate(divide="ignore", invalid="ignore"):
        return np.where(b != 0, a / np.where(b != 0, b, 1), 0)


def _super(w: np.ndarray, sub: int) -> np.ndarray:
    # (rows, K) -> (blocks, 256 / sub, sub)
    assert w.shape[1] % QK == 0, w.shape
    return w.astype(np.float32).reshape(-1, QK // sub, sub)


def _scale_min_k4(sc: np.ndarray, m: np.ndarray) -> np.ndarray:
    # eight 6-bit (scale, min) pairs per block -> 12 bytes (get_scale_min_k4's inverse)
    sc, m = sc.astype(np.uint8), m.astype(np.uint8)
    out = np.zeros((sc.shape[0], 12), np.uint8)
    out[:, 0:4] = sc[:, 0:4] | ((sc[:, 4:8] >> 4) << 6)
    out[:, 4:8] = m[:, 0:4] | ((m[:, 4:8] >> 4) << 6)
    out[:, 8:12] = (sc[:, 4:8] & 15) | ((m[:, 4:8] & 15) << 4)
    return out


def _asymmetric(x: np.ndarray, levels: int, scale_max: int):
    # sub-blocks x (B, S, n) -> d, dmin (B,), small scale sc and min m (B, S), codes q (B, S, n)
    lo, hi = np.minimum(x.min(-1), 0), x.max(-1)
    scale, mins = (hi - lo) / levels, -lo
    d, dmin = _f16(scale.max(-1) / scale_max), _f16(mins.max(-1) / scale_max)
    sc = np.clip(np.round(_div(scale, d.astype(np.float32)[:, None])), 0, scale_max)
    m = np.clip(np.round(_div(mins, dmin.astype(np.float32)[:, None])), 0, scale_max)
    step = d.astype(np.float32)[:, None] * sc
    offset = dmin.astype(np.float32)[:, None] * m
    q = np.clip(np.round(_div(x + offset[..., None], step[..., None])), 0, levels)
    return d, dmin, sc, m, q.astype(np.uint8)


def _symmetric(x: np.ndarray, low: int, high: int, scale_lo: int, scale_hi: int):
    # codes in low..high, signed small scales in scale_lo..scale_hi: d (B,), sc (B, S), q (B, S, n)
    scale = x[np.arange(x.shape[0])[:, None], np.arange(x.shape[1]), np.abs(x).argmax(-1)] / low  # max|x| -> low
    d = _f16(np.abs(scale).max(-1) / max(-scale_lo, scale_hi))
    sc = np.clip(np.round(_div(scale, d.astype(np.float32)[:, None])), scale_lo, scale_hi)
    q = np.clip(np.round(_div(x, (d.astype(np.float32)[:, None] * sc)[..., None])), low, high)
    return d, sc, q.astype(np.int16)


def encode_q4_k(w: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _asymmetric(_super(w, 32), 15, 63)
    qs = (q[:, 0::2] | (q[:, 1::2] << 4)).reshape(-1, 128)  # groups 2i, 2i+1 share 32 bytes
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                             _scale_min_k4(sc, m), qs], axis=1)
    return blocks.reshape(w.shape[0], -1)


def encode_q5_k(w: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _asymmetric(_super(w, 32), 31, 63)
    low = q & 15
    qs = (low[:, 0::2] | (low[:, 1::2] << 4)).reshape(-1, 128)
    qh = ((q >> 4) << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1).astype(np.uint8)  # bit g of byte l
    blocks = np.concatenate([d.view(np.uint8).reshape(-1, 2), dmin.view(np.uint8).reshape(-1, 2),
                             _scale_min_k4(sc, m), qh, qs], axis=1)
    return blocks.reshape(w.shape[0], -1)


def encode_q6_k(w: np.ndarray) -> np.ndarray:
    d, sc, q = _symmetric(_super(w, 16), -32, 31, -128, 127)
    u = (q + 32).astype(np.uint8).reshape(-1, 2, 4, 32)  # (block, n, quarter k, l)
    ql = np.zeros((u.shape[0], 2, 2, 32), np.uint8)  # (block, n, k % 2, l): 64 bytes per half
    for k in range(4):
        ql[:, :, k % 2] |= (u[:, :, k] & 15) << (4 * (k // 2))
    qh = ((u >> 4) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(2).astype(np.uint8)
    blocks = np.concatenate([ql.reshape(-1, 128), qh.reshape(-1, 64), sc.astype(np.int8).view(np.uint8),
                             d.view(np.uint8).reshape(-1, 2)], axis=1)
    return blocks.reshape(w.shape[0], -1)


def encode_q3_k(w: np.ndarray) -> np.ndarray:
    d, sc, q = _symmetric(_super(w, 16), -4, 3, -32, 31)
    u = (q + 4).astype(np.uint8).reshape(-1, 2, 4, 32)  # (block, n, j, l)
    qs = ((u & 3) << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(2).astype(np.uint8)  # (block, n, l)
    bits = (u >> 2).reshape(-1, 8, 32)  # bit 4 n + j of hmask[l]
    hmask = (bits << np.arange(8, dtype=np.uint8)[None, :, None]).sum(1).astype(np.uint8)
    s6 = (sc + 32).astype(np.uint8)  # (block, 16)
    scales = np.zeros((s6.shape[0], 12), np.uint8)
    for s in range(16):
        scales[:, s % 8] |= (s6[:, s] & 15) << (4 * (s // 8))
        scales[:, 8 + s % 4] |= (s6[:, s] >> 4) << (2 * (s // 4))
    blocks = np.concatenate([hmask, qs.reshape(-1, 64), scales, d.view(np.uint8).reshape(-1, 2)], axis=1)
    return blocks.reshape(w.shape[0], -1)


def encode_q2_k(w: np.ndarray) -> np.ndarray:
    d, dmin, sc, m, q = _asymmetric(_super(w, 16), 3, 15)
    u = q.reshape(-1, 2, 4, 32)  # (block, n, j, l)
    qs = (u << (2 * np.arange(4, dtype=np.uint8))[None, None, :, None]).sum(2).astype(np.uint8)
    scales = (sc.astype(np.uint8) | (m.astype(np.uint8) << 4))
    blocks = np.concatenate([scales, qs.reshape(-1, 64), d.view(np.uint8).reshape(-1, 2),
                             dmin.view(np.uint8).reshape(-1, 2)], axis=1)
    return blocks.reshape(w.shape[0], -1)


ENCODERS = {Q.Q2_K: encode_q2_k, Q.Q3_K: encode_q3_k, Q.Q4_K: encode_q4_k, Q.Q5_K: encode_q5_k, Q.Q6_K: encode_q6_k}


def quantize(w: np.ndarray, kind: Q) -> np.ndarray:
    """Rows of ggml blocks of `kind` for float weights (rows, K): gguf-py's own quantizer for
    the legacy types, the encoders above for the K-quants."""
    import gguf

    if kind in ENCODERS:
        return ENCODERS[kind](w)
    return gguf.quants.quantize(w.astype(np.float32), kind)
