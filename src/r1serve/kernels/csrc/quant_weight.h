// Float weights into the G formats (quant_formats.h), and any packed row back to floats. No
// ATen here (the ARM harness builds it).
//
//   int4 (G4): code = round((w - min) / scale) in 0..15, scale = (max - min) / 15, min = min
//   int8 (G8): code = round(w / scale) + 128 in 1..255, scale = max|w| / 127, min = -128 scale
//
// Codes are chosen against the stored (float16) scale and minimum, not the exact ones;
// rounding is to nearest even and every step is the float32 operation kernels/
// quantized_weight.py's twin performs, so both give the same bytes. A row's padding columns
// (K..32 G) repeat its last value: inside the last group's range.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <stdexcept>

#include "gguf_repack.h"
#include "quant_formats.h"
#include "vec_types.h"

namespace r1serve_kernels {

// One row's group g of a float weight as a G-format unit.
template <typename T>
void quantize_group(const T* row, int64_t K, int64_t g, int bits, Unit& v) {
  float w[kGroup];
  for (int64_t k = 0; k < kGroup; ++k) w[k] = r1serve_vec::to_float(row[std::min(g * kGroup + k, K - 1)]);
  float lo = w[0], hi = w[0], amax = 0.f;
  for (float x : w) lo = std::min(lo, x), hi = std::max(hi, x), amax = std::max(amax, std::fabs(x));
  if (bits == 4) {
    v.scale = float_to_half((hi - lo) / 15.f);
    v.min = float_to_half(lo);
  } else {
    v.scale = float_to_half(amax / 127.f);
    v.min = half_times(v.scale, -128.f);
  }
  const float s = r1serve_vec::half_to_float(v.scale), m = r1serve_vec::half_to_float(v.min);
  if (!std::isfinite(s)) throw std::range_error("weights out of float16 range: int groups cannot hold them");
  for (int64_t k = 0; k < kGroup; ++k) {
    float q = s > 0.f ? std::nearbyint((w[k] - m) / s) : 0.f;
    q = bits == 4 ? std::min(std::max(q, 0.f), 15.f) : (s > 0.f ? std::min(std::max(q, 1.f), 255.f) : 128.f);
    v.u[k] = static_cast<uint8_t>(q);
  }
}

// Row block nb of a float weight (rows x K, row stride ld) into out (one G-format block of
// K columns; every byte is written, padding rows as zeros).
template <typename T>
void quantize_block(const T* w, int64_t ld, int64_t rows, int64_t K, int bits, int64_t nb, uint8_t* out) {
  Unit v[kRows];
  const int64_t G = (K + kGroup - 1) / kGroup, n = std::min(kRows, rows - nb * kRows);
  for (int64_t g = 0; g < G; ++g) {
    for (int64_t r = 0; r < n; ++r) quantize_group(w + (nb * kRows + r) * ld, K, g, bits, v[r]);
    for (int64_t r = n; r < kRows; ++r) v[r] = Unit{};
    if (bits == 4)
      write_block_unit<Fmt::G4>(v, out + g * Format<Fmt::G4>::kUnitBytes);
    else
      write_block_unit<Fmt::G8>(v, out + g * Format<Fmt::G8>::kUnitBytes);
  }
}

// Row r of a packed block (format F, K columns) as floats: scale * u + min, or
// (d sc) u - dmin m in the K formats (float32 operations; the twin's float64 dequantize
// rounds once, which these match wherever the product d sc u is exact in float32).
template <Fmt F>
void dequantize_block_row(const uint8_t* block, int64_t r, int64_t K, float* out) {
  using Fm = Format<F>;
  const int64_t units = units_of(F, K);
  for (int64_t unit = 0; unit < units; ++unit) {
    const uint8_t* base = block + unit * Fm::kUnitBytes;
    float d = 0.f, dmin = 0.f;
    if constexpr (Fm::kTwoLevel) {
      d = r1serve_vec::half_to_float(load_u16(base + 2 * r));
      dmin = r1serve_vec::half_to_float(load_u16(base + 2 * (kRows + r)));
    }
    for (int64_t g = 0; g < Fm::kGroupsPerUnit; ++g) {
      const uint8_t* t = base + Fm::kHeaderBytes + g * Fm::kTileBytes;
      const uint8_t* s = t + Fm::kCodeBytes;
      for (int64_t k = 0; k < kGroup; ++k) {
        const int64_t col = (unit * Fm::kGroupsPerUnit + g) * kGroup + k;
        if (col >= K) return;
        int nibble;
        const uint8_t byte = t[code_byte(Fm::kBits, r, k, &nibble)];
        const float u = static_cast<float>(Fm::kBits == 4 ? (byte >> (4 * nibble)) & 15 : byte);
        if constexpr (Fm::kTwoLevel) {
          const int h = Fm::kHalves == 2 ? static_cast<int>(k / 16) : 0;
          const float sc = static_cast<int8_t>(s[kRows * h + r]), m = static_cast<int8_t>(s[kRows * (Fm::kHalves + h) + r]);
          out[col] = static_cast<float>(static_cast<double>(d * sc) * u - static_cast<double>(dmin * m));
        } else {
          const float scale = r1serve_vec::half_to_float(load_u16(s + 2 * r));
          const float mn = r1serve_vec::half_to_float(load_u16(s + 2 * (kRows + r)));
          out[col] = static_cast<float>(static_cast<double>(scale) * u + static_cast<double>(mn));
        }
      }
    }
  }
}

inline void dequantize_block_row(Fmt f, const uint8_t* block, int64_t r, int64_t K, float* out) {
  switch (f) {
    case Fmt::G4: return dequantize_block_row<Fmt::G4>(block, r, K, out);
    case Fmt::G8: return dequantize_block_row<Fmt::G8>(block, r, K, out);
    case Fmt::K4: return dequantize_block_row<Fmt::K4>(block, r, K, out);
    case Fmt::K8: return dequantize_block_row<Fmt::K8>(block, r, K, out);
  }
}

}  // namespace r1serve_kernels
