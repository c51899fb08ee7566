// Weight-only GEMM for a few rows (decode) with weights in int4 or int8 groups of 32: the
// kernel's core, without ATen.
//
// Decoding one sequence reads every weight once per token, so the time is the time to
// stream the weights. Int4 halves the bytes of int8; the arithmetic must then stay well
// below the memory time, which is what the choices here are for:
//
// * Activations are quantized to int8 once per call, per group of 32 (as llama.cpp's Q8_1),
//   so the inner loop is integer dot products (vec.h's vdot_*: VPDPBUSD on AVX512-VNNI,
//   VPMADDUBSW + VPMADDWD on AVX2, SDOT on ARM) and never converts a weight to float.
// * The int32 lanes are output rows: a (row block, group) tile is a 16 x 32 patch of the
//   weight, interleaved so each register load (16 / kLanes per 64 bytes) feeds dot
//   products with no shuffle and no horizontal sum. Scales are applied once per 32
//   products, in float.
// * Each thread's share of the weight is one contiguous run of memory (scales inline),
//   streamed with software prefetch a few tiles ahead, and read from memory once per call:
//   every activation row passes over a row block while it is in L1 (as many rows per pass
//   as the ISA's registers hold accumulators for: kRowsAllRegs, kRowsPerPass below).
//
// Weight layout, `packed`: uint8 (NB, G, T) with NB = ceil(N / 16), G = ceil(K / 32), and
// T = 320 (4-bit codes) or 576 (8-bit). One (block nb, group g) tile covers rows
// 16nb..16nb+15 and columns 32g..32g+31; with u[r][i] the code of row 16nb + r, column 32g + i:
//
//   4 bits: bytes 0..255 are 4 chunks of 64; chunk c holds columns 8c..8c+7:
//             byte 64c + 4r + j   low nibble  = u[r][8c + j]      (j < 4)
//                                 high nibble = u[r][8c + 4 + j]
//   8 bits: bytes 0..511 are 8 chunks of 64; chunk c holds columns 4c..4c+3:
//             byte 64c + 4r + j   = u[r][4c + j]
//   then    scale[r], float16, r = 0..15   (32 bytes)
//           min[r],   float16              (32 bytes)
//
//   weight[n][k] ~= scale * u + min   (4 bits: u in 0..15, Q4_1's form;
//                                      8 bits: u in 1..255, min = -128 scale, Q8_0's form)
//
// With x ~= dx * a (a int8, per group), one group's contribution to row n is
//   sum_k (scale u_k + min) dx a_k = (scale dx) * sum_k u_k a_k + min * (dx sum_k a_k)
// Where vdot_bytes gives sum (u - 128) a (kByteDotOffset), the 8-bit min term becomes
// (min + 128 scale) = 0: Q8_0's codes are signed bytes.
// The padding rows (N..16NB) are not stored; padding columns (K..32G) meet zero activations.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "vec.h"

namespace r1serve_kernels {
using namespace r1serve_vec;

constexpr int64_t kRows = 16, kGroup = 32;
constexpr int kRegs = kRows / kLanes;  // registers per 16 output rows
// A pass over a row block serves M activation rows on R of its registers of rows and keeps
// 2 M R accumulators live (float sums over the groups, integer sums within one), beside
// about 6 registers for the weights, broadcasts and scales; more spills in the inner loop.
// A few rows take all registers in one pass, so that the block streams from memory under
// the arithmetic (the one-row case is memory-bound). More rows take one register per pass,
// kRowsPerPass at a time, the block then read from L1 by all passes but the first.
constexpr int kAccumRegs = kVecRegs - 6;
constexpr int kRowsPerPass = kAccumRegs >= 16 ? 8 : 4;
constexpr int kRowsAllRegs = std::max(1, std::min(kRowsPerPass, kAccumRegs / (2 * kRegs)));
// Software prefetch this many tiles ahead (2.5 KB for int4); the hardware prefetcher alone
// left the one-row case ~20% short on the largest matrix. 8 to 24 tiles measured alike.
constexpr int64_t kPrefetchTiles = 8;

template <int kBits>
constexpr int64_t tile_bytes() {
  return kRows * kGroup * kBits / 8 + 2 * kRows * 2;  // codes, then fp16 scales and mins
}

// One row of activations quantized per group: a (int8, padded to G*32), dx, sx = dx*sum(a).
struct QuantRow {
  std::vector<int8_t> a;
  std::vector<float> dx, sx;
};

// A whole group a register at a time: the same operations as the scalar loop below.
template <typename T>
void quantize_group_vec(const T* x, int8_t* a, float& dx, float& sx) {
  constexpr int NV = kGroup / kLanes;
  vf v[NV], amax = vzero();
  for (int j = 0; j < NV; ++j) amax = vmax(amax, vabs(v[j] = vload(x + kLanes * j)));
  const float m = vhmax(amax), d = m / 127.f, id = m > 0.f ? 127.f / m : 0.f;
  vf sum = vzero();
  for (int j = 0; j < NV; ++j) {
    const vf q = vrint(vmul(v[j], vset1(id)));
    vstore_i8(a + kLanes * j, q);
    sum = vadd(sum, q);  // integers below 2^12: exact in float
  }
  dx = d;
  sx = d * vhsum(sum);
}

// Rounding is to nearest even, as torch.round in the twin; the scales are computed with the
// same float32 operations, so the twin reproduces the int8 values exactly.
template <typename T>
void quantize_row(const T* x, int64_t K, int64_t G, QuantRow& out) {
  out.a.assign(G * kGroup, 0);
  out.dx.assign(G, 0.f);
  out.sx.assign(G, 0.f);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k0 = g * kGroup, n = std::min(kGroup, K - k0);
    if (n == kGroup) {
      quantize_group_vec(x + k0, out.a.data() + k0, out.dx[g], out.sx[g]);
      continue;
    }
    float amax = 0.f;
    for (int64_t k = 0; k < n; ++k) amax = std::max(amax, std::fabs(to_float(x[k0 + k])));
    const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int64_t k = 0; k < n; ++k) {
      const int32_t q = static_cast<int32_t>(std::nearbyint(to_float(x[k0 + k]) * id));
      out.a[k0 + k] = static_cast<int8_t>(q);
      sum += q;
    }
    out.dx[g] = d;
    out.sx[g] = d * static_cast<float>(sum);
  }
}

inline int32_t four(const int8_t* a) {
  int32_t v;
  std::memcpy(&v, a, 4);
  return v;
}

// s[m][r] (lane l: row r * kLanes + l from t on) = those rows' 32 columns dotted with a_m.
// Chunks are 64 bytes apart.
template <int kBits, int M, int R>
inline void tile_dots(const uint8_t* t, const int8_t* const a[M], vi s[M][R]) {
  constexpr int kRegBytes = 4 * kLanes;
  if constexpr (kBits == 4) {  // 8 vnib_dot per group: the most a vnib holds exactly
    vnib p[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) p[m][r] = vnib_zero();
    for (int c = 0; c < 4; ++c)
      for (int r = 0; r < R; ++r) {
        const vbytes v = vload_bytes(t + 64 * c + kRegBytes * r);
        const vbytes lo = vlow_nibbles(v), hi = vhigh_nibbles(v);
        for (int m = 0; m < M; ++m) {
          p[m][r] = vnib_dot(p[m][r], lo, four(a[m] + 8 * c));
          p[m][r] = vnib_dot(p[m][r], hi, four(a[m] + 8 * c + 4));
        }
      }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) s[m][r] = vnib_finish(p[m][r]);
  } else {
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) s[m][r] = vizero();
    for (int c = 0; c < 8; ++c)
      for (int r = 0; r < R; ++r) {
        const vcodes8 v = vprep_bytes(vload_bytes(t + 64 * c + kRegBytes * r));
        for (int m = 0; m < M; ++m) s[m][r] = vdot_bytes(s[m][r], v, four(a[m] + 4 * c));
      }
  }
}

// Registers r0 .. r0 + R of one row block (its rows r0 * kLanes ...) for M activation rows,
// over all groups: out[m][r] lane l = row (r0 + r) * kLanes + l dotted with row m. Each tile
// read prefetches the one `ahead` bytes on (none for 0).
template <int kBits, int M, int R>
void block_part(const uint8_t* tiles, int64_t G, const QuantRow* xs, int r0, int64_t ahead, vf out[M][R]) {
  constexpr int64_t T = tile_bytes<kBits>(), kCodeBytes = T - 64;
  constexpr float kMinShift = kBits == 8 ? static_cast<float>(kByteDotOffset) : 0.f;
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) out[m][r] = vzero();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* t = tiles + g * T;
    if (ahead != 0)
      for (int64_t line = 0; line < T; line += 64) __builtin_prefetch(t + ahead + line, 0, 3);
    const int8_t* a[M];
    for (int m = 0; m < M; ++m) a[m] = xs[m].a.data() + g * kGroup;
    vi s[M][R];
    tile_dots<kBits, M, R>(t + 4 * kLanes * r0, a, s);
    const uint16_t* halves = reinterpret_cast<const uint16_t*>(t + kCodeBytes) + kLanes * r0;
    for (int r = 0; r < R; ++r) {
      const vf scale = vload_half(halves + kLanes * r);
      const vf mn = vfmadd(vset1(kMinShift), scale, vload_half(halves + kRows + kLanes * r));
      for (int m = 0; m < M; ++m) {
        out[m][r] = vfmadd(vcvt(s[m][r]), vmul(scale, vset1(xs[m].dx[g])), out[m][r]);
        out[m][r] = vfmadd(mn, vset1(xs[m].sx[g]), out[m][r]);
      }
    }
  }
}

// y[m][0 .. n) = out[m] (+ bias), n <= R * kLanes rows.
template <typename T, int M, int R>
inline void store_part(T* y, int64_t ldy, const vf out[M][R], const T* bias, int64_t n) {
  for (int r = 0; r < R; ++r) {
    const int64_t left = std::min<int64_t>(kLanes, n - r * kLanes);
    if (left <= 0) break;
    vf b = vzero();
    if (bias != nullptr) {
      float part[kLanes] = {0.f};
      for (int64_t i = 0; i < left; ++i) part[i] = to_float(bias[r * kLanes + i]);
      b = vload(part);
    }
    for (int m = 0; m < M; ++m) {
      T* out_row = y + m * ldy + r * kLanes;
      if (left == kLanes)
        vstore(out_row, vadd(out[m][r], b));
      else
        vstore_first(out_row, vadd(out[m][r], b), static_cast<int>(left));
    }
  }
}

// Prefetching by the passes over one block: the first streams it, kPrefetchTiles ahead; the
// second (with more than a few rows) fetches the next block (contiguous after this one) while
// the block itself is served from L1, so that memory stays busy through the later passes.
inline int64_t prefetch_ahead(int pass, int64_t G, int64_t T) {
  return pass == 0 ? kPrefetchTiles * T : pass == 1 ? G * T : 0;
}

// `left` activation rows on registers r0 .. r0 + R of a block (n of its rows from r0 on),
// M at a time, then fewer for the last ones; `pass` counts the passes over the block.
template <typename T, int kBits, int M, int R>
void part_rows(const uint8_t* tiles, int64_t G, const QuantRow* xs, int r0, int& pass, const T* bias, T* y,
               int64_t ldy, int64_t n, int64_t left) {
  vf out[M][R];
  for (; left >= M; left -= M, xs += M, y += M * ldy) {
    block_part<kBits, M, R>(tiles, G, xs, r0, prefetch_ahead(pass++, G, tile_bytes<kBits>()), out);
    store_part<T, M, R>(y, ldy, out, bias, n);
  }
  if constexpr (M > 1)
    if (left > 0) part_rows<T, kBits, M - 1, R>(tiles, G, xs, r0, pass, bias, y, ldy, n, left);
}

// Row blocks nb0..nb1 of y (M, N) = x W^T (+ bias), for all M rows: each block, once read
// from memory, serves every row while it is in L1.
template <typename T, int kBits>
void gemm_blocks(const uint8_t* packed, int64_t N, int64_t G, const std::vector<QuantRow>& xs, const T* bias, T* y,
                 int64_t nb0, int64_t nb1) {
  const int64_t M = static_cast<int64_t>(xs.size());
  for (int64_t nb = nb0; nb < nb1; ++nb) {
    const uint8_t* tiles = packed + nb * G * tile_bytes<kBits>();
    const int64_t n0 = nb * kRows, n = std::min(kRows, N - n0);
    const T* b = bias ? bias + n0 : nullptr;
    int pass = 0;
    if (M <= kRowsAllRegs) {
      part_rows<T, kBits, kRowsAllRegs, kRegs>(tiles, G, xs.data(), 0, pass, b, y + n0, N, n, M);
      continue;
    }
    for (int r = 0; r < kRegs && r * kLanes < n; ++r)
      part_rows<T, kBits, kRowsPerPass, 1>(tiles, G, xs.data(), r, pass, b ? b + r * kLanes : nullptr,
                                           y + n0 + r * kLanes, N, n - r * kLanes, M);
  }
}

}  // namespace r1serve_kernels
