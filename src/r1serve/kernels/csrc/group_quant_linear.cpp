// Weight-only GEMM for a few rows (decode) with weights in int4 or int8 groups of 32, on
// AVX512-VNNI CPUs.
//
// Decoding one sequence reads every weight once per token, so the time is the time to
// stream the weights. Int4 halves the bytes of int8; the arithmetic must then stay well
// below the memory time, which is what the choices here are for:
//
// * Activations are quantized to int8 once per call, per group of 32 (as llama.cpp's Q8_1),
//   so the inner loop is integer dot products (VPDPBUSD: 64 u8 x s8 products, summed in
//   fours into 16 int32 lanes) and never converts a weight to float.
// * The 16 int32 lanes are 16 output rows: a (row block, group) tile is a 16 x 32 patch of
//   the weight, interleaved so each 64-byte load feeds VPDPBUSDs with no shuffle and no
//   horizontal sum. Scales are applied once per 32 products, in float.
// * Each thread's share of the weight is one contiguous run of memory (scales inline),
//   streamed with software prefetch a few tiles ahead.
//
// Built only where the compiler targets AVX512-VNNI and AVX512-BF16 (-march=native on such
// a CPU); elsewhere group_quant_linear_available() is false and callers keep int8 or bf16.
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
// The padding rows (N..16NB) are not stored; padding columns (K..32G) meet zero activations.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>
#include <cstring>
#include <optional>
#include <vector>

#if defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VNNI__) && defined(__AVX512BF16__)
#define R1SERVE_GROUP_QUANT_KERNEL 1
#endif

bool group_quant_linear_available() {
#ifdef R1SERVE_GROUP_QUANT_KERNEL
  return true;
#else
  return false;
#endif
}

namespace {

constexpr int64_t kRows = 16, kGroup = 32;

template <int kBits>
constexpr int64_t tile_bytes() {
  return kRows * kGroup * kBits / 8 + 2 * kRows * 2;  // codes, then fp16 scales and mins
}

}  // namespace

#ifdef R1SERVE_GROUP_QUANT_KERNEL
namespace {

// Software prefetch this many tiles ahead (2.5 KB for int4); the hardware prefetcher alone
// leaves the one-row case ~20% short on the largest matrix. 8 to 24 tiles measure alike.
constexpr int64_t kPrefetchTiles = 8;

// One row of activations quantized per group: a (int8, padded to G*32), dx, sx = dx*sum(a).
struct QuantRow {
  std::vector<int8_t> a;
  std::vector<float> dx, sx;
};

// Rounding is to nearest even, as torch.round in the twin; the scales are computed with the
// same float32 operations, so the twin reproduces the int8 values exactly.
void quantize_row(const at::BFloat16* x, int64_t K, int64_t G, QuantRow& out) {
  out.a.assign(G * kGroup, 0);
  out.dx.assign(G, 0.f);
  out.sx.assign(G, 0.f);
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k0 = g * kGroup, n = std::min(kGroup, K - k0);
    float amax = 0.f;
    for (int64_t k = 0; k < n; ++k) amax = std::max(amax, std::fabs(static_cast<float>(x[k0 + k])));
    const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum = 0;
    for (int64_t k = 0; k < n; ++k) {
      const int32_t q = static_cast<int32_t>(std::nearbyint(static_cast<float>(x[k0 + k]) * id));
      out.a[k0 + k] = static_cast<int8_t>(q);
      sum += q;
    }
    out.dx[g] = d;
    out.sx[g] = d * static_cast<float>(sum);
  }
}

inline __m512 load_half16(const uint8_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}

inline __m512i broadcast4(const int8_t* a) {
  int32_t v;
  std::memcpy(&v, a, 4);
  return _mm512_set1_epi32(v);
}

// sum[m] (lane r) += sum over the tile's 32 columns of u[r][i] * a_m[i], in two int32
// accumulators per row so the VPDPBUSD dependency chain is half as long.
template <int kBits, int M>
inline void tile_dots(const uint8_t* t, const int8_t* const a[M], __m512i s0[M], __m512i s1[M]) {
  if constexpr (kBits == 4) {
    const __m512i nib = _mm512_set1_epi8(0x0F);
    for (int c = 0; c < 4; ++c) {
      const __m512i v = _mm512_loadu_si512(t + 64 * c);
      const __m512i lo = _mm512_and_si512(v, nib);
      const __m512i hi = _mm512_and_si512(_mm512_srli_epi16(v, 4), nib);
      for (int m = 0; m < M; ++m) {
        s0[m] = _mm512_dpbusd_epi32(s0[m], lo, broadcast4(a[m] + 8 * c));
        s1[m] = _mm512_dpbusd_epi32(s1[m], hi, broadcast4(a[m] + 8 * c + 4));
      }
    }
  } else {
    for (int c = 0; c < 8; c += 2) {
      const __m512i v0 = _mm512_loadu_si512(t + 64 * c), v1 = _mm512_loadu_si512(t + 64 * c + 64);
      for (int m = 0; m < M; ++m) {
        s0[m] = _mm512_dpbusd_epi32(s0[m], v0, broadcast4(a[m] + 4 * c));
        s1[m] = _mm512_dpbusd_epi32(s1[m], v1, broadcast4(a[m] + 4 * c + 4));
      }
    }
  }
}

// Rows 16nb..16nb+15 of the output for M activation rows; the lanes of out[m] are output rows.
template <int kBits, int M>
void row_block(const uint8_t* tiles, int64_t G, const QuantRow* xs, __m512 out[M]) {
  constexpr int64_t T = tile_bytes<kBits>(), kCodeBytes = T - 64;
  __m512 acc[M], accmin[M];
  for (int m = 0; m < M; ++m) acc[m] = accmin[m] = _mm512_setzero_ps();
  for (int64_t g = 0; g < G; ++g) {
    const uint8_t* t = tiles + g * T;
    for (int64_t line = 0; line < T / 64; ++line)
      _mm_prefetch(reinterpret_cast<const char*>(t + kPrefetchTiles * T + 64 * line), _MM_HINT_T0);
    const int8_t* a[M];
    __m512i s0[M], s1[M];
    for (int m = 0; m < M; ++m) {
      a[m] = xs[m].a.data() + g * kGroup;
      s0[m] = s1[m] = _mm512_setzero_si512();
    }
    tile_dots<kBits, M>(t, a, s0, s1);
    const __m512 scale = load_half16(t + kCodeBytes), mn = load_half16(t + kCodeBytes + 32);
    for (int m = 0; m < M; ++m) {
      const __m512 dots = _mm512_cvtepi32_ps(_mm512_add_epi32(s0[m], s1[m]));
      acc[m] = _mm512_fmadd_ps(dots, _mm512_mul_ps(scale, _mm512_set1_ps(xs[m].dx[g])), acc[m]);
      accmin[m] = _mm512_fmadd_ps(mn, _mm512_set1_ps(xs[m].sx[g]), accmin[m]);
    }
  }
  for (int m = 0; m < M; ++m) out[m] = _mm512_add_ps(acc[m], accmin[m]);
}

inline void store_bf16(at::BFloat16* dst, __m512 v, const at::BFloat16* bias, int64_t n) {
  const __mmask16 mask = n >= 16 ? 0xFFFF : static_cast<__mmask16>((1u << n) - 1);
  if (bias != nullptr) {  // bf16 -> float is a 16-bit shift
    const __m256i b = _mm256_maskz_loadu_epi16(mask, bias);
    v = _mm512_add_ps(v, _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(b), 16)));
  }
  _mm256_mask_storeu_epi16(dst, mask, reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

// Threads split the row blocks into contiguous runs: each streams its own part of the weight.
template <int kBits, int M>
void gemm_rows(const uint8_t* packed, int64_t N, int64_t G, const QuantRow* xs, const at::BFloat16* bias,
               at::BFloat16* y, int64_t ldy) {
  const int64_t NB = (N + kRows - 1) / kRows;
  at::parallel_for(0, NB, 1, [&](int64_t b0, int64_t b1) {
    __m512 out[M];
    for (int64_t nb = b0; nb < b1; ++nb) {
      row_block<kBits, M>(packed + nb * G * tile_bytes<kBits>(), G, xs, out);
      const int64_t n0 = nb * kRows, n = std::min(kRows, N - n0);
      for (int m = 0; m < M; ++m) store_bf16(y + m * ldy + n0, out[m], bias ? bias + n0 : nullptr, n);
    }
  });
}

// Rows go four at a time: each weight tile, once loaded, serves every row of the chunk.
template <int kBits>
void gemm(const uint8_t* w, int64_t N, int64_t G, const std::vector<QuantRow>& xs, const at::BFloat16* b,
          at::BFloat16* y) {
  const int64_t M = static_cast<int64_t>(xs.size());
  int64_t m = 0;
  for (; m + 4 <= M; m += 4) gemm_rows<kBits, 4>(w, N, G, xs.data() + m, b, y + m * N, N);
  switch (M - m) {
    case 3: gemm_rows<kBits, 3>(w, N, G, xs.data() + m, b, y + m * N, N); break;
    case 2: gemm_rows<kBits, 2>(w, N, G, xs.data() + m, b, y + m * N, N); break;
    case 1: gemm_rows<kBits, 1>(w, N, G, xs.data() + m, b, y + m * N, N); break;
    default: break;
  }
}

}  // namespace
#endif  // R1SERVE_GROUP_QUANT_KERNEL

// x: (M, K) bf16; packed: (ceil(N/16), ceil(K/32), 320 or 576) uint8; bias: (N,) bf16 or None
// -> (M, N) bf16
at::Tensor group_quant_linear(const at::Tensor& x, const at::Tensor& packed, int64_t N, int64_t bits,
                              const std::optional<at::Tensor>& bias) {
#ifndef R1SERVE_GROUP_QUANT_KERNEL
  TORCH_CHECK(false, "group_quant_linear: not built (needs a CPU with AVX512-VNNI and AVX512-BF16)");
  return at::Tensor();
#else
  TORCH_CHECK(bits == 4 || bits == 8, "group_quant_linear: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() == 2 && x.scalar_type() == at::kBFloat16 && x.is_contiguous(),
              "group_quant_linear: x must be a contiguous bf16 (M, K)");
  const int64_t M = x.size(0), K = x.size(1), G = (K + kGroup - 1) / kGroup, NB = (N + kRows - 1) / kRows;
  const int64_t T = bits == 4 ? tile_bytes<4>() : tile_bytes<8>();
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.size(0) == NB && packed.size(1) == G && packed.size(2) == T,
              "group_quant_linear: packed has shape ", packed.sizes(), ", expected (", NB, ", ", G, ", ", T, ")");
  TORCH_CHECK(!bias || (bias->scalar_type() == at::kBFloat16 && bias->is_contiguous() && bias->numel() == N),
              "group_quant_linear: bias must be a contiguous bf16 (N,)");
  at::Tensor y = at::empty({M, N}, x.options());
  std::vector<QuantRow> xs(M);
  const at::BFloat16* xp = x.data_ptr<at::BFloat16>();
  for (int64_t m = 0; m < M; ++m) quantize_row(xp + m * K, K, G, xs[m]);
  const at::BFloat16* b = bias ? bias->data_ptr<at::BFloat16>() : nullptr;
  if (bits == 4)
    gemm<4>(packed.data_ptr<uint8_t>(), N, G, xs, b, y.data_ptr<at::BFloat16>());
  else
    gemm<8>(packed.data_ptr<uint8_t>(), N, G, xs, b, y.data_ptr<at::BFloat16>());
  return y;
#endif
}
