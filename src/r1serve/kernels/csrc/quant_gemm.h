// The GEMM over quantized weights (quant_formats.h), for every batch size: the kernel's core,
// without ATen.
//
// Decoding one sequence reads every weight once per token, so its time is the time to stream
// the weights; a prefill of hundreds of rows is arithmetic. The same loop serves both:
//
// * Activations are quantized to int8 once per call, per group of 32 (as llama.cpp's Q8_1),
//   so the inner loop is integer dot products (vec.h's vdot_*: VPDPBUSD on AVX512-VNNI and
//   AVX-VNNI, VPMADDUBSW + VPMADDWD on AVX2, SDOT on ARM) and never converts a weight to float.
// * The int32 lanes are output rows: a group's tile is a 16 x 32 patch of the weight,
//   interleaved so each register load feeds dot products with no shuffle and no horizontal
//   sum. Scales are applied once per 32 products (16 for K8's halves), in float.
// * Each thread's share of the weight is one contiguous run of memory (scales inline).
//   A few activation rows (decode) take all registers in one pass over a row block, which
//   streams from memory under the arithmetic, software-prefetched ahead. More rows are
//   blocked by rows, columns and row blocks (gemm_blocks), kRowsPerPass rows a pass on one
//   register of rows, so that a block's tiles are read from memory once per chunk of rows
//   and from L1 by the other passes, and the rows' activations stay in L2.
//
// With x ~= dx * a (a int8, per group), a group's contribution to row n is
//   sum_k (scale u_k + min) dx a_k = (scale dx) * sum_k u_k a_k + min * (dx sum_k a_k)
// and where vdot_bytes gives sum (u - 128) a (kByteDotOffset), min becomes min + 128 scale.
// K8's codes (at most 63) skip that: see kNarrowDot.
#pragma once

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <vector>

#include "quant_formats.h"
#include "vec.h"

namespace r1serve_kernels {
using namespace r1serve_vec;

constexpr int kRegs = kRows / kLanes;  // registers per 16 output rows
// A pass over a row block serves M activation rows on R of its registers of rows and keeps
// 2 M R accumulators live (float sums over the groups, integer sums within one), beside
// about 6 registers for the weights, broadcasts and scales; more spills in the inner loop.
constexpr int kAccumRegs = kVecRegs - 6;
constexpr int kRowsPerPass = kAccumRegs >= 16 ? 8 : 4;
constexpr int kRowsAllRegs = std::max(1, std::min(kRowsPerPass, kAccumRegs / (2 * kRegs)));
// Software prefetch this far ahead (8 G4 tiles); the hardware prefetcher alone left the
// one-row case ~20% short on the largest matrix. 8 to 24 tiles measured alike.
constexpr int64_t kPrefetchBytes = 8 * 320;
// The int8 activations a chunk of rows may take over a chunk of columns: well inside a
// 1-2 MB L2 beside the float tile of sums.
constexpr int64_t kChunkBytes = 256 << 10;

// M rows of activations quantized per group of 32: codes a in -127..127, dx (x ~= dx a),
// sx = dx * sum(a), and sh = dx * sum(a) over each half of a group (K8's scale groups of 16).
// Group-major, as a pass reads them: a pass over rows m0..m0+7 of group g finds each row's
// codes and scales at fixed offsets from one pointer (no per-row pointer to keep in a
// register or reload).
//
//   a   (G, M, 32) int8      dx, sx   (G, M) float      sh   (G, M, 2) float
struct QuantRows {
  int64_t M = 0, G = 0;
  std::vector<int8_t> a;
  std::vector<float> dx, sx, sh;

  void resize(int64_t rows, int64_t groups) {
    M = rows, G = groups;
    a.resize(G * M * kGroup);  // unset: quantize_row writes all of a row
    dx.resize(G * M);
    sx.resize(G * M);
    sh.resize(2 * G * M);
  }
  const int8_t* codes(int64_t g, int64_t m) const { return a.data() + (g * M + m) * kGroup; }
};

// A whole group a register at a time: the same operations as the scalar loop below.
template <typename T>
void quantize_group_vec(const T* x, int8_t* a, float& dx, float& sx, float* sh) {
  constexpr int NV = kGroup / kLanes;
  vf v[NV], amax = vzero();
  for (int j = 0; j < NV; ++j) amax = vmax(amax, vabs(v[j] = vload(x + kLanes * j)));
  const float m = vhmax(amax), d = m / 127.f, id = m > 0.f ? 127.f / m : 0.f;
  vf half[2] = {vzero(), vzero()};
  for (int j = 0; j < NV; ++j) {
    const vf q = vrint(vmul(v[j], vset1(id)));
    vstore_i8(a + kLanes * j, q);
    half[j * 2 / NV] = vadd(half[j * 2 / NV], q);  // integers below 2^12: exact in float
  }
  const float s0 = vhsum(half[0]), s1 = vhsum(half[1]);
  dx = d;
  sx = d * (s0 + s1);
  sh[0] = d * s0;
  sh[1] = d * s1;
}

// Row m of x (K values) into xs. Rounding is to nearest even, as torch.round in the twin;
// the scales are computed with the same float32 operations, so the twin reproduces the int8
// values exactly.
template <typename T>
void quantize_row(const T* x, int64_t K, QuantRows& xs, int64_t m) {
  for (int64_t g = 0; g < xs.G; ++g) {
    const int64_t k0 = g * kGroup, n = std::min(kGroup, K - k0), at = g * xs.M + m;
    int8_t* a = xs.a.data() + at * kGroup;
    if (n == kGroup) {
      quantize_group_vec(x + k0, a, xs.dx[at], xs.sx[at], xs.sh.data() + 2 * at);
      continue;
    }
    float amax = 0.f;
    for (int64_t k = 0; k < n; ++k) amax = std::max(amax, std::fabs(to_float(x[k0 + k])));
    const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum[2] = {0, 0};
    for (int64_t k = 0; k < kGroup; ++k) {
      const int32_t q = k < n ? static_cast<int32_t>(std::nearbyint(to_float(x[k0 + k]) * id)) : 0;
      a[k] = static_cast<int8_t>(q);
      sum[k / 16] += q;
    }
    xs.dx[at] = d;
    xs.sx[at] = d * static_cast<float>(sum[0] + sum[1]);
    xs.sh[2 * at] = d * static_cast<float>(sum[0]);
    xs.sh[2 * at + 1] = d * static_cast<float>(sum[1]);
  }
}

inline int32_t four(const int8_t* a) {
  int32_t v;
  std::memcpy(&v, a, 4);
  return v;
}

// Whether format F's 8-bit codes go through the nibble dot product (vnib: unsigned codes by
// signed activations) rather than vdot_bytes. Where the ISA has no unsigned x signed 4-way
// dot product, vdot_bytes takes u - 128 with its sign moved onto each activation row's
// broadcast (two more operations per product and row); K8's codes are at most 63, so they
// multiply as they are, and a vnib holds two such calls exactly (2 x 2 x 63 x 127 < 2^15).
template <Fmt F>
constexpr bool kNarrowDot = Format<F>::kBits == 8 && Format<F>::kMaxCode <= 63 && kByteDotOffset != 0;

// What the group's dot products leave out: sum_k (u_k - offset) a_k.
template <Fmt F>
constexpr int kDotOffset = Format<F>::kBits == 8 && !kNarrowDot<F> ? kByteDotOffset : 0;

// s[m][r] (lane l: row r * kLanes + l from t on) = those rows' columns c0..c1 of the group
// dotted with activation row m (its codes at a + 32 m), less kDotOffset<F> times the
// activations' sum. Chunks are 64 bytes apart.
template <Fmt F, int M, int R>
inline void tile_dots(const uint8_t* t, const int8_t* a, int c0, int c1, vi s[M][R]) {
  constexpr int kRegBytes = 4 * kLanes;
  if constexpr (Format<F>::kBits == 4) {  // 8 vnib_dot per group: the most a vnib holds exactly
    vnib p[M][R];
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) p[m][r] = vnib_zero();
    for (int c = c0 / 8; c < c1 / 8; ++c)
      for (int r = 0; r < R; ++r) {
        const vbytes v = vload_bytes(t + 64 * c + kRegBytes * r);
        const vbytes lo = vlow_nibbles(v), hi = vhigh_nibbles(v);
        for (int m = 0; m < M; ++m) {
          p[m][r] = vnib_dot(p[m][r], lo, four(a + kGroup * m + 8 * c));
          p[m][r] = vnib_dot(p[m][r], hi, four(a + kGroup * m + 8 * c + 4));
        }
      }
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) s[m][r] = vnib_finish(p[m][r]);
  } else if constexpr (kNarrowDot<F>) {  // chunks in pairs, each pair's vnib widened into s
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) s[m][r] = vizero();
    for (int c = c0 / 4; c < c1 / 4; c += 2)
      for (int r = 0; r < R; ++r) {
        const vbytes v0 = vload_bytes(t + 64 * c + kRegBytes * r), v1 = vload_bytes(t + 64 * (c + 1) + kRegBytes * r);
        for (int m = 0; m < M; ++m) {
          vnib p = vnib_dot(vnib_zero(), v0, four(a + kGroup * m + 4 * c));
          p = vnib_dot(p, v1, four(a + kGroup * m + 4 * c + 4));
          s[m][r] = vadd_i32(s[m][r], vnib_finish(p));
        }
      }
  } else {
    for (int m = 0; m < M; ++m)
      for (int r = 0; r < R; ++r) s[m][r] = vizero();
    for (int c = c0 / 4; c < c1 / 4; ++c)
      for (int r = 0; r < R; ++r) {
        const vcodes8 v = vprep_bytes(vload_bytes(t + 64 * c + kRegBytes * r));
        for (int m = 0; m < M; ++m) s[m][r] = vdot_bytes(s[m][r], v, four(a + kGroup * m + 4 * c));
      }
  }
}

// One register of rows' scales for scale group h of a group: w = scale * u + mn (mn with
// the dot's byte offset folded in). d and nd = -dmin are the unit's super-scales (K formats).
template <Fmt F>
inline void group_scales(const uint8_t* t, int reg, int h, vf d, vf nd, vf& scale, vf& mn) {
  using Fm = Format<F>;
  const uint8_t* s = t + Fm::kCodeBytes;
  if constexpr (Fm::kTwoLevel) {
    const int8_t* sc = reinterpret_cast<const int8_t*>(s) + kLanes * reg;
    scale = vmul(d, vload_i8(sc + kRows * h));
    mn = vmul(nd, vload_i8(sc + kRows * (Fm::kHalves + h)));
  } else {
    const uint16_t* halves = reinterpret_cast<const uint16_t*>(s) + kLanes * reg;
    scale = vload_half(halves);
    mn = vload_half(halves + kRows);
  }
  if constexpr (kDotOffset<F> != 0) mn = vfmadd(vset1(static_cast<float>(kDotOffset<F>)), scale, mn);
}

// Registers r0 .. r0 + R of one row block (its rows r0 * kLanes ...) for activation rows
// m0 .. m0 + M, over units u0..u1: out[m][r] lane l = row (r0 + r) * kLanes + l dotted with
// row m0 + m. Each tile read prefetches the bytes `ahead` on (none for 0). The sums live in
// local registers and go to `out` once at the end (through the pointer, the compiler stored
// them back after every group).
template <Fmt F, int M, int R>
void block_part(const uint8_t* block, int64_t u0, int64_t u1, const QuantRows& xs, int64_t m0, int r0,
                int64_t ahead, vf out[M][R]) {
  using Fm = Format<F>;
  constexpr int H = Fm::kHalves;
  vf acc[M][R];
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) acc[m][r] = vzero();
  for (int64_t u = u0; u < u1; ++u) {
    const uint8_t* unit = block + u * Fm::kUnitBytes;
    vf d[R], nd[R];
    for (int r = 0; r < R; ++r) {
      d[r] = nd[r] = vzero();
      if constexpr (Fm::kTwoLevel) {
        const uint16_t* header = reinterpret_cast<const uint16_t*>(unit) + kLanes * (r0 + r);
        d[r] = vload_half(header);
        nd[r] = vsub(vzero(), vload_half(header + kRows));
      }
    }
    for (int64_t gi = 0; gi < Fm::kGroupsPerUnit; ++gi) {
      const uint8_t* t = unit + Fm::kHeaderBytes + gi * Fm::kTileBytes;
      if (ahead != 0)
        for (int64_t line = 0; line < Fm::kTileBytes; line += 64) __builtin_prefetch(t + ahead + line, 0, 3);
      const int64_t g = u * Fm::kGroupsPerUnit + gi, at = g * xs.M + m0;
      const int8_t* a = xs.a.data() + at * kGroup;
      const float *dx = xs.dx.data() + at, *sx = xs.sx.data() + at, *sh = xs.sh.data() + 2 * at;
      // The scale groups one after the other (K8: two halves of 16 columns), so that one set
      // of integer accumulators serves both: two sets spilled at 8 rows a pass.
      for (int h = 0; h < H; ++h) {
        vi s[M][R];
        tile_dots<F, M, R>(t + 4 * kLanes * r0, a, kGroup * h / H, kGroup * (h + 1) / H, s);
        for (int r = 0; r < R; ++r) {
          vf scale, mn;
          group_scales<F>(t, r0 + r, h, d[r], nd[r], scale, mn);
          for (int m = 0; m < M; ++m) {
            acc[m][r] = vfmadd(vcvt(s[m][r]), vmul(scale, vset1(dx[m])), acc[m][r]);
            acc[m][r] = vfmadd(mn, vset1(H == 1 ? sx[m] : sh[2 * m + h]), acc[m][r]);
          }
        }
      }
    }
  }
  for (int m = 0; m < M; ++m)
    for (int r = 0; r < R; ++r) out[m][r] = acc[m][r];
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

// What one call's rows of one row block need: the block, its units, its output rows.
struct BlockJob {
  const uint8_t* block;
  int64_t units;
  int64_t n;  // output rows of the block (16, or fewer in the last)
};

// A few rows (decode): all of them on every register of a block in one pass, the block
// streamed from memory kPrefetchBytes ahead under the arithmetic, then stored (+ bias).
template <typename T, Fmt F, int M>
void decode_rows(const BlockJob& job, const QuantRows& xs, int64_t m0, const T* bias, T* y, int64_t ldy,
                 int64_t left) {
  vf out[M][kRegs];
  for (; left >= M; left -= M, m0 += M, y += M * ldy) {
    block_part<F, M, kRegs>(job.block, 0, job.units, xs, m0, 0, kPrefetchBytes, out);
    store_part<T, M, kRegs>(y, ldy, out, bias, job.n);
  }
  if constexpr (M > 1)
    if (left > 0) decode_rows<T, F, M - 1>(job, xs, m0, bias, y, ldy, left);
}

// `left` rows on register r of a block over units u0..u1, kRowsPerPass at a time, then fewer
// for the last: each pass's sums go into the float tile acc (row stride lda), added to what
// the earlier column chunks left there unless `first`. The first pass prefetches `ahead`
// bytes on (the same columns of the next block); the others read the block from L1.
template <Fmt F, int M>
void acc_rows(const uint8_t* block, int64_t u0, int64_t u1, const QuantRows& xs, int64_t m0, int r, bool first,
              float* acc, int64_t lda, int64_t left, int64_t ahead) {
  vf out[M][1];
  for (; left >= M; left -= M, m0 += M, acc += M * lda, ahead = 0) {
    block_part<F, M, 1>(block, u0, u1, xs, m0, r, ahead, out);
    for (int m = 0; m < M; ++m) {
      float* a = acc + m * lda + r * kLanes;
      vstore(a, first ? out[m][0] : vadd(vload(a), out[m][0]));
    }
  }
  if constexpr (M > 1)
    if (left > 0) acc_rows<F, M - 1>(block, u0, u1, xs, m0, r, first, acc, lda, left, ahead);
}

// Columns per chunk (a row block's tiles over them: ~20 KB, in L1) and rows per chunk (their
// int8 activations over those columns: kChunkBytes, in L2, a multiple of a pass's rows).
template <Fmt F>
constexpr int64_t kChunkUnits = std::max<int64_t>(1, 2048 / Format<F>::kUnitCols);

inline int64_t chunk_rows(int64_t M, int64_t cols) {
  const int64_t fit = std::max<int64_t>(kRowsPerPass, kChunkBytes / std::max<int64_t>(cols, 1));
  return std::min(M, fit / kRowsPerPass * kRowsPerPass);
}

// Row blocks nb0..nb1 of y (M, N) = x W^T (+ bias) for a weight of format F: y and bias point
// at the weight's first output row, ldy is y's row stride.
//
// More rows than a decode pass takes (a prefill, a batch of streams) are blocked three ways,
// so that what each loop reuses stays in cache:
//
//   for each chunk of rows                    their activations, chunk by chunk, in L2
//     for each chunk of columns               a block's tiles over them in L1
//       for each row block: passes of kRowsPerPass rows, summed into a float tile (rows x
//       this thread's outputs, L2)
//     the tile (+ bias) -> y
//
// Weights stream from memory once per chunk of rows (not once per pass: a 7B down
// projection's 19k columns gave 8-row chunks and 128 streams of 40 MB per prefill step).
template <typename T, Fmt F>
void gemm_blocks(const uint8_t* packed, int64_t N, int64_t K, const QuantRows& xs, const T* bias, T* y, int64_t ldy,
                 int64_t nb0, int64_t nb1) {
  using Fm = Format<F>;
  const int64_t M = xs.M, units = units_of(F, K), bytes = units * Fm::kUnitBytes;
  if (M <= kRowsAllRegs) {
    for (int64_t nb = nb0; nb < nb1; ++nb) {
      const BlockJob job{packed + nb * bytes, units, std::min(kRows, N - nb * kRows)};
      decode_rows<T, F, kRowsAllRegs>(job, xs, 0, bias ? bias + nb * kRows : nullptr, y + nb * kRows, ldy, M);
    }
    return;
  }
  const int64_t ku = std::min(units, kChunkUnits<F>), mc = chunk_rows(M, ku * Fm::kUnitCols);
  const int64_t lda = (nb1 - nb0) * kRows;
  thread_local std::vector<float> tile;  // reused: a decode batch calls this ~120 times a step
  tile.resize(mc * lda);
  for (int64_t m0 = 0; m0 < M; m0 += mc) {
    const int64_t rows = std::min(mc, M - m0);
    for (int64_t u0 = 0; u0 < units; u0 += ku)
      for (int64_t nb = nb0; nb < nb1; ++nb) {
        const uint8_t* block = packed + nb * bytes;
        const int64_t n = std::min(kRows, N - nb * kRows);
        for (int r = 0; r < kRegs && r * kLanes < n; ++r)
          acc_rows<F, kRowsPerPass>(block, u0, std::min(units, u0 + ku), xs, m0, r, u0 == 0,
                                    tile.data() + (nb - nb0) * kRows, lda, rows, bytes);
      }
    for (int64_t m = 0; m < rows; ++m)
      for (int64_t nb = nb0; nb < nb1; ++nb) {
        vf out[1][kRegs];
        for (int r = 0; r < kRegs; ++r) out[0][r] = vload(tile.data() + m * lda + (nb - nb0) * kRows + r * kLanes);
        store_part<T, 1, kRegs>(y + (m0 + m) * ldy + nb * kRows, ldy, out, bias ? bias + nb * kRows : nullptr,
                                std::min(kRows, N - nb * kRows));
      }
  }
}

template <typename T>
void gemm_blocks(Fmt f, const uint8_t* packed, int64_t N, int64_t K, const QuantRows& xs, const T* bias, T* y,
                 int64_t ldy, int64_t nb0, int64_t nb1) {
  switch (f) {
    case Fmt::G4: return gemm_blocks<T, Fmt::G4>(packed, N, K, xs, bias, y, ldy, nb0, nb1);
    case Fmt::G8: return gemm_blocks<T, Fmt::G8>(packed, N, K, xs, bias, y, ldy, nb0, nb1);
    case Fmt::K4: return gemm_blocks<T, Fmt::K4>(packed, N, K, xs, bias, y, ldy, nb0, nb1);
    case Fmt::K8: return gemm_blocks<T, Fmt::K8>(packed, N, K, xs, bias, y, ldy, nb0, nb1);
  }
}

// One weight of a linear: the output rows row0..row0 + rows, stored in format fmt.
struct Segment {
  Fmt fmt;
  int64_t row0, rows;
  const uint8_t* packed;
  int64_t blocks() const { return (rows + kRows - 1) / kRows; }
};

// A thread's share of a linear's segments: the blocks from (segment s0, block b0) up to
// (s1, b1), cut so that every thread streams about the same bytes.
struct Share {
  int64_t s0, b0, s1, b1;
};

inline Share share_of(const std::vector<Segment>& segs, int64_t K, int64_t t, int64_t threads) {
  int64_t total = 0;
  for (const auto& s : segs) total += s.blocks() * block_bytes(s.fmt, K);
  const int64_t lo = total * t / threads, hi = total * (t + 1) / threads;
  Share sh{0, 0, 0, 0};  // empty until a block's middle falls in [lo, hi)
  int64_t at = 0;
  bool started = false;
  for (int64_t i = 0; i < static_cast<int64_t>(segs.size()); ++i) {
    const int64_t per = block_bytes(segs[i].fmt, K);
    for (int64_t b = 0; b < segs[i].blocks(); ++b, at += per) {
      // A block goes to the thread whose byte range holds its middle.
      const int64_t mid = at + per / 2;
      if (mid >= hi) return sh;
      if (mid < lo) continue;
      if (!started) sh = {i, b, i, b}, started = true;
      sh.s1 = i, sh.b1 = b + 1;
    }
  }
  return sh;
}

// y (M, N) = x W^T (+ bias) over this thread's share of the segments.
template <typename T>
void gemm_share(const std::vector<Segment>& segs, const Share& sh, int64_t K, const QuantRows& xs, const T* bias, T* y,
                int64_t ldy) {
  for (int64_t i = sh.s0; i <= sh.s1 && i < static_cast<int64_t>(segs.size()); ++i) {
    const Segment& s = segs[i];
    const int64_t b0 = i == sh.s0 ? sh.b0 : 0, b1 = i == sh.s1 ? sh.b1 : s.blocks();
    if (b0 < b1)
      gemm_blocks<T>(s.fmt, s.packed, s.rows, K, xs, bias ? bias + s.row0 : nullptr, y + s.row0, ldy, b0, b1);
  }
}

}  // namespace r1serve_kernels
