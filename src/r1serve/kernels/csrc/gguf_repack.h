// GGUF's block formats (ggml's Q4_0 ... Q6_K) rewritten into the quantized GEMM's packed
// formats (quant_formats.h), one 16-row block at a time, straight from the file's bytes: no
// float copy of a weight exists on the way. No ATen here (the ARM harness builds it).
//
// A ggml block covers 32 columns (Q4_0, Q4_1, Q5_0, Q5_1, Q8_0) or 256 (the K-quants), one
// unit of the target format; decode_<type> reads one block of one row into `Unit`, and
// write_block_unit places a block's 16 rows of one unit into its tiles (write_unit, one row
// at a time, is the plain statement of that layout the tests write with). The bit layouts are ggml's
// (ggml-common.h, dequantize_row_* in ggml-quants.c), named here column by column:
//
//   Q4_0  d | qs[16]                  u[j] = qs[j] & 15, u[j+16] = qs[j] >> 4     w = d (u - 8)
//   Q4_1  d | m | qs[16]              as Q4_0                                     w = d u + m
//   Q5_0  d | qh[4] | qs[16]          as Q4_0, bit 4 = bit j (j+16) of qh         w = d (u - 16)
//   Q5_1  d | m | qh[4] | qs[16]      as Q5_0                                     w = d u + m
//   Q8_0  d | qs[32] (int8)           q = qs[j]                                   w = d q
//   Q2_K  scales[16] | qs[64] | d | dmin        column c: n = c/128, j = c%128/32, l = c%32:
//         u = qs[32 n + l] >> 2 j & 3, scale byte s = c / 16      w = d (s & 15) u - dmin (s >> 4)
//   Q3_K  hmask[32] | qs[64] | scales[12] | d   u = (qs[32 n + l] >> 2 j & 3) + 4 * (hmask[l] >> (4 n + j) & 1),
//         6-bit scale sc of sub-block c / 16                                  w = d (sc - 32) (u - 4)
//   Q4_K  d | dmin | scales[12] | qs[128]       group g = c / 32: u = qs[32 (g/2) + c%32] >> 4 (g%2) & 15,
//         6-bit (sc, m) of group g                                                w = d sc u - dmin m
//   Q5_K  d | dmin | scales[12] | qh[32] | qs[128]   Q4_K's nibble + 16 * (qh[c%32] >> g & 1)
//   Q6_K  ql[128] | qh[64] | scales[16] | d     n = c/128, k = c%128/32, l = c%32:
//         u = (ql[64 n + 32 (k%2) + l] >> 4 (k/2) & 15) | (qh[32 n + l] >> 2 k & 3) << 4,
//         int8 scale sc of sub-block c / 16                                       w = d sc (u - 32)
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <stdexcept>
#include <string>

#include "quant_formats.h"
#include "vec_types.h"

namespace r1serve_kernels {

// ggml's type ids (GGMLQuantizationType) of the block formats read here.
enum GgmlType : int { Q4_0 = 2, Q4_1 = 3, Q5_0 = 6, Q5_1 = 7, Q8_0 = 8, Q2_K = 10, Q3_K = 11, Q4_K = 12, Q5_K = 13,
                      Q6_K = 14 };

// One row's values over one unit of its target format.
struct Unit {
  uint8_t u[256] = {};           // codes by column
  uint16_t scale = 0, min = 0;   // G formats: fp16 bits
  uint16_t d = 0, dmin = 0;      // K formats: the super-block's fp16 bits
  int8_t sc[16] = {}, m[16] = {};  // K formats: per group g and half h at [2 g + h]
};

inline uint16_t load_u16(const uint8_t* p) {
  uint16_t v;
  std::memcpy(&v, p, 2);
  return v;
}

// IEEE half bits of an exactly representable float (a half times a power of two), rounded
// to nearest even otherwise; inf where it overflows.
inline uint16_t float_to_half(float f) {
  uint32_t x;
  std::memcpy(&x, &f, 4);
  const uint32_t sign = (x >> 16) & 0x8000;
  const int32_t exp = static_cast<int32_t>((x >> 23) & 0xFF) - 127 + 15;
  uint32_t man = x & 0x7FFFFF;
  if (((x >> 23) & 0xFF) == 0xFF) return static_cast<uint16_t>(sign | 0x7C00 | (man ? 0x200 : 0));
  if (exp >= 31) return static_cast<uint16_t>(sign | 0x7C00);
  if (exp <= 0) {  // subnormal half (or zero)
    if (exp < -10) return static_cast<uint16_t>(sign);
    man |= 0x800000;
    const int shift = 14 - exp;
    uint32_t h = man >> shift;
    const uint32_t rest = man & ((1u << shift) - 1), halfway = 1u << (shift - 1);
    if (rest > halfway || (rest == halfway && (h & 1))) ++h;
    return static_cast<uint16_t>(sign | h);
  }
  uint32_t h = (static_cast<uint32_t>(exp) << 10) | (man >> 13);
  const uint32_t rest = man & 0x1FFF;
  if (rest > 0x1000 || (rest == 0x1000 && (h & 1))) ++h;  // may carry into the exponent: still right
  return static_cast<uint16_t>(sign | h);
}

// The half times an integer power of two (Q4_0's -8 d, Q6_K's 32 d), exactly or inf.
inline uint16_t half_times(uint16_t h, float k) { return float_to_half(r1serve_vec::half_to_float(h) * k); }

// ---- one ggml block of one row --------------------------------------------------------

inline void nibbles32(const uint8_t* qs, uint8_t* u) {
  for (int j = 0; j < 16; ++j) u[j] = qs[j] & 15, u[j + 16] = qs[j] >> 4;
}

inline void fifth_bits(const uint8_t* qh, uint8_t* u) {
  uint32_t bits;
  std::memcpy(&bits, qh, 4);
  for (int j = 0; j < 32; ++j) u[j] |= ((bits >> j) & 1) << 4;
}

inline void decode_q4_0(const uint8_t* b, Unit& out) {
  out.scale = load_u16(b);
  out.min = half_times(out.scale, -8.f);
  nibbles32(b + 2, out.u);
}

inline void decode_q4_1(const uint8_t* b, Unit& out) {
  out.scale = load_u16(b);
  out.min = load_u16(b + 2);
  nibbles32(b + 4, out.u);
}

inline void decode_q5_0(const uint8_t* b, Unit& out) {
  out.scale = load_u16(b);
  out.min = half_times(out.scale, -16.f);
  nibbles32(b + 6, out.u);
  fifth_bits(b + 2, out.u);
}

inline void decode_q5_1(const uint8_t* b, Unit& out) {
  out.scale = load_u16(b);
  out.min = load_u16(b + 2);
  nibbles32(b + 8, out.u);
  fifth_bits(b + 4, out.u);
}

inline void decode_q8_0(const uint8_t* b, Unit& out) {
  out.scale = load_u16(b);
  out.min = half_times(out.scale, -128.f);
  for (int j = 0; j < 32; ++j) out.u[j] = static_cast<uint8_t>(b[2 + j] ^ 0x80);  // q + 128
}

// Q4_K's and Q5_K's 12 bytes of eight 6-bit (scale, min) pairs (ggml's get_scale_min_k4).
inline void scale_min_k4(const uint8_t* q, int j, int8_t& sc, int8_t& m) {
  if (j < 4) {
    sc = static_cast<int8_t>(q[j] & 63);
    m = static_cast<int8_t>(q[j + 4] & 63);
  } else {
    sc = static_cast<int8_t>((q[j + 4] & 0xF) | ((q[j - 4] >> 6) << 4));
    m = static_cast<int8_t>((q[j + 4] >> 4) | ((q[j] >> 6) << 4));
  }
}

inline void decode_q4_k(const uint8_t* b, Unit& out) {
  out.d = load_u16(b);
  out.dmin = load_u16(b + 2);
  const uint8_t *scales = b + 4, *qs = b + 16;
  for (int g = 0; g < 8; ++g) {
    scale_min_k4(scales, g, out.sc[2 * g], out.m[2 * g]);
    out.sc[2 * g + 1] = out.sc[2 * g], out.m[2 * g + 1] = out.m[2 * g];
    for (int l = 0; l < 32; ++l) out.u[32 * g + l] = (qs[32 * (g / 2) + l] >> (4 * (g % 2))) & 15;
  }
}

inline void decode_q5_k(const uint8_t* b, Unit& out) {
  out.d = load_u16(b);
  out.dmin = load_u16(b + 2);
  const uint8_t *scales = b + 4, *qh = b + 16, *qs = b + 48;
  for (int g = 0; g < 8; ++g) {
    scale_min_k4(scales, g, out.sc[2 * g], out.m[2 * g]);
    out.sc[2 * g + 1] = out.sc[2 * g], out.m[2 * g + 1] = out.m[2 * g];
    for (int l = 0; l < 32; ++l)
      out.u[32 * g + l] = static_cast<uint8_t>(((qs[32 * (g / 2) + l] >> (4 * (g % 2))) & 15) | (((qh[l] >> g) & 1) << 4));
  }
}

inline void decode_q6_k(const uint8_t* b, Unit& out) {
  const uint8_t *ql = b, *qh = b + 128;
  const int8_t* scales = reinterpret_cast<const int8_t*>(b + 192);
  out.d = load_u16(b + 208);
  out.dmin = half_times(out.d, 32.f);  // w = d sc (u - 32) = (d sc) u - (32 d) sc
  for (int s = 0; s < 16; ++s) out.sc[s] = out.m[s] = scales[s];
  for (int n = 0; n < 2; ++n)  // ggml's order: four columns 32 apart from each pair of bytes
    for (int l = 0; l < 32; ++l) {
      const uint8_t lo0 = ql[64 * n + l], lo1 = ql[64 * n + 32 + l], hi = qh[32 * n + l];
      uint8_t* u = out.u + 128 * n + l;
      u[0] = static_cast<uint8_t>((lo0 & 15) | (hi & 3) << 4);
      u[32] = static_cast<uint8_t>((lo1 & 15) | ((hi >> 2) & 3) << 4);
      u[64] = static_cast<uint8_t>((lo0 >> 4) | ((hi >> 4) & 3) << 4);
      u[96] = static_cast<uint8_t>((lo1 >> 4) | ((hi >> 6) & 3) << 4);
    }
}

inline void decode_q3_k(const uint8_t* b, Unit& out) {
  const uint8_t *hmask = b, *qs = b + 32, *scales = b + 96;
  out.d = load_u16(b + 108);
  out.dmin = half_times(out.d, 4.f);  // w = d s (u - 4) = (d s) u - (4 d) s
  for (int s = 0; s < 16; ++s) {
    const int lo = (scales[s % 8] >> (4 * (s / 8))) & 15, hi = (scales[8 + s % 4] >> (2 * (s / 4))) & 3;
    out.sc[s] = out.m[s] = static_cast<int8_t>((lo | hi << 4) - 32);
  }
  for (int n = 0; n < 2; ++n)
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l)
        out.u[128 * n + 32 * j + l] =
            static_cast<uint8_t>(((qs[32 * n + l] >> (2 * j)) & 3) + 4 * ((hmask[l] >> (4 * n + j)) & 1));
}

inline void decode_q2_k(const uint8_t* b, Unit& out) {
  const uint8_t *scales = b, *qs = b + 16;
  out.d = load_u16(b + 80);
  out.dmin = load_u16(b + 82);
  for (int s = 0; s < 16; ++s) out.sc[s] = static_cast<int8_t>(scales[s] & 15), out.m[s] = static_cast<int8_t>(scales[s] >> 4);
  for (int n = 0; n < 2; ++n)
    for (int j = 0; j < 4; ++j)
      for (int l = 0; l < 32; ++l) out.u[128 * n + 32 * j + l] = (qs[32 * n + l] >> (2 * j)) & 3;
}

// ---- formats ----------------------------------------------------------------------------

struct BlockFormat {
  int64_t block_bytes, block_cols;
  Fmt target;
  void (*decode)(const uint8_t*, Unit&);
};

inline BlockFormat block_format(int type) {
  switch (type) {
    case Q4_0: return {18, 32, Fmt::G4, decode_q4_0};
    case Q4_1: return {20, 32, Fmt::G4, decode_q4_1};
    case Q5_0: return {22, 32, Fmt::G8, decode_q5_0};
    case Q5_1: return {24, 32, Fmt::G8, decode_q5_1};
    case Q8_0: return {34, 32, Fmt::G8, decode_q8_0};
    case Q2_K: return {84, 256, Fmt::K8, decode_q2_k};
    case Q3_K: return {110, 256, Fmt::K8, decode_q3_k};
    case Q4_K: return {144, 256, Fmt::K4, decode_q4_k};
    case Q5_K: return {176, 256, Fmt::K8, decode_q5_k};
    case Q6_K: return {210, 256, Fmt::K8, decode_q6_k};
    default: throw std::invalid_argument("ggml type " + std::to_string(type) + " has no packed form");
  }
}

// Row r's unit `unit` goes into its block's tiles (`out` = the block's first byte).
template <Fmt F>
void write_unit(const Unit& v, int64_t r, int64_t unit, uint8_t* out) {
  using Fm = Format<F>;
  uint8_t* base = out + unit * Fm::kUnitBytes;
  if constexpr (Fm::kTwoLevel) {
    std::memcpy(base + 2 * r, &v.d, 2);
    std::memcpy(base + 2 * (kRows + r), &v.dmin, 2);
  }
  for (int64_t g = 0; g < Fm::kGroupsPerUnit; ++g) {
    uint8_t* t = base + Fm::kHeaderBytes + g * Fm::kTileBytes;
    for (int64_t k = 0; k < kGroup; ++k) {
      int nibble;
      const int64_t at = code_byte(Fm::kBits, r, k, &nibble);
      t[at] |= static_cast<uint8_t>(v.u[kGroup * g + k] << (4 * nibble));
    }
    uint8_t* s = t + Fm::kCodeBytes;
    if constexpr (Fm::kTwoLevel) {
      for (int h = 0; h < Fm::kHalves; ++h) {
        s[kRows * h + r] = static_cast<uint8_t>(v.sc[2 * g + h]);
        s[kRows * (Fm::kHalves + h) + r] = static_cast<uint8_t>(v.m[2 * g + h]);
      }
    } else {
      std::memcpy(s + 2 * r, &v.scale, 2);
      std::memcpy(s + 2 * (kRows + r), &v.min, 2);
    }
  }
}

// One unit of a row block, all 16 rows at once (`v`: rows beyond the weight all zero):
// write_unit's layout, each byte written once and in order, no byte read back.
template <Fmt F>
void write_block_unit(const Unit* v, uint8_t* base) {
  using Fm = Format<F>;
  if constexpr (Fm::kTwoLevel) {
    for (int64_t r = 0; r < kRows; ++r) {
      std::memcpy(base + 2 * r, &v[r].d, 2);
      std::memcpy(base + 2 * (kRows + r), &v[r].dmin, 2);
    }
  }
  for (int64_t g = 0; g < Fm::kGroupsPerUnit; ++g) {
    uint8_t* t = base + Fm::kHeaderBytes + g * Fm::kTileBytes;
    const int64_t col = kGroup * g;
    if constexpr (Fm::kBits == 4) {
      for (int64_t c = 0; c < 4; ++c)
        for (int64_t r = 0; r < kRows; ++r)
          for (int64_t j = 0; j < 4; ++j)
            t[64 * c + 4 * r + j] = static_cast<uint8_t>(v[r].u[col + 8 * c + j] | (v[r].u[col + 8 * c + 4 + j] << 4));
    } else {
      for (int64_t c = 0; c < 8; ++c)
        for (int64_t r = 0; r < kRows; ++r) std::memcpy(t + 64 * c + 4 * r, v[r].u + col + 4 * c, 4);
    }
    uint8_t* s = t + Fm::kCodeBytes;
    for (int64_t r = 0; r < kRows; ++r) {
      if constexpr (Fm::kTwoLevel) {
        for (int h = 0; h < Fm::kHalves; ++h) {
          s[kRows * h + r] = static_cast<uint8_t>(v[r].sc[2 * g + h]);
          s[kRows * (Fm::kHalves + h) + r] = static_cast<uint8_t>(v[r].m[2 * g + h]);
        }
      } else {
        std::memcpy(s + 2 * r, &v[r].scale, 2);
        std::memcpy(s + 2 * (kRows + r), &v[r].min, 2);
      }
    }
  }
}

// Row block nb of a weight of `rows` rows x `units` blocks per row, each row row_bytes of
// ggml blocks at raw + row * row_bytes, into out (block_bytes(target, K) bytes; every byte is
// written, padding rows as zeros).
template <Fmt F>
void repack_block(const BlockFormat& bf, const uint8_t* raw, int64_t row_bytes, int64_t rows, int64_t units,
                  int64_t nb, uint8_t* out) {
  Unit v[kRows];
  const int64_t n = std::min(kRows, rows - nb * kRows);
  for (int64_t unit = 0; unit < units; ++unit) {
    for (int64_t r = 0; r < n; ++r) bf.decode(raw + (nb * kRows + r) * row_bytes + unit * bf.block_bytes, v[r]);
    for (int64_t r = n; r < kRows; ++r) v[r] = Unit{};
    write_block_unit<F>(v, out + unit * Format<F>::kUnitBytes);
  }
}

inline void repack_block(const BlockFormat& bf, const uint8_t* raw, int64_t row_bytes, int64_t rows, int64_t units,
                         int64_t nb, uint8_t* out) {
  switch (bf.target) {
    case Fmt::G4: return repack_block<Fmt::G4>(bf, raw, row_bytes, rows, units, nb, out);
    case Fmt::G8: return repack_block<Fmt::G8>(bf, raw, row_bytes, rows, units, nb, out);
    case Fmt::K4: return repack_block<Fmt::K4>(bf, raw, row_bytes, rows, units, nb, out);
    case Fmt::K8: return repack_block<Fmt::K8>(bf, raw, row_bytes, rows, units, nb, out);
  }
}

}  // namespace r1serve_kernels
