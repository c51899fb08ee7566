// The CPU kernels' cores against scalar oracles, without torch: built for the machine, for
// the portable scalar header, and cross-compiled for ARM64 and run under qemu-aarch64 by
// tests/test_kernel_isas.py. Prints "ok <isa> <extensions>" or the first failures.
#include <cstdio>
#include <cstdlib>
#include <limits>
#include <random>
#include <vector>

// First: its fp-contract pragma must precede the vector layer's functions, as in its own build.
#include "rotary_kv_write.h"
// clang-format off
#include "argmax_rows.h"
#include "gguf_repack.h"
#include "quant_gemm.h"
#include "paged_decode_attention.h"
#include "rms_norm.h"
#include "silu_and_mul.h"

using namespace r1serve_vec;
using namespace r1serve_kernels;

static int failures = 0;
static std::mt19937 rng(1234);

#define CHECK(cond, ...)                       \
  do {                                         \
    if (!(cond)) {                             \
      if (++failures <= 20) {                  \
        std::printf("FAIL %s:%d ", __FILE__, __LINE__); \
        std::printf(__VA_ARGS__);              \
        std::printf("\n");                     \
      }                                        \
    }                                          \
  } while (0)

static float uniform(float lo, float hi) { return std::uniform_real_distribution<float>(lo, hi)(rng); }

template <typename T>
static std::vector<T> random_vec(size_t n, float lo = -2.f, float hi = 2.f) {
  std::vector<T> v(n);
  for (auto& x : v) x = from_float<T>(uniform(lo, hi));
  return v;
}

static bool close(float a, float b, float atol, float rtol) { return std::fabs(a - b) <= atol + rtol * std::fabs(b); }

static void test_exp() {
  for (float x = -80.f; x < 80.f; x += 0.37f) {
    float in[kLanes], out[kLanes];
    for (int i = 0; i < kLanes; ++i) in[i] = x + 0.01f * i;
    vstore(out, vexp(vload(in)));
    for (int i = 0; i < kLanes; ++i) CHECK(close(out[i], std::exp(in[i]), 0.f, 3e-7f), "exp(%g) = %g", in[i], out[i]);
  }
}

static void test_bf16_and_half() {
  std::vector<float> xs = {0.f, -0.f, 1.f, 1.00390625f, 1.01171875f, std::numeric_limits<float>::infinity(),
                           -std::numeric_limits<float>::infinity(), std::nanf(""), 3.4e38f, 1e-40f};
  while (xs.size() % kLanes || xs.size() < 4096) xs.push_back(uniform(-1e4f, 1e4f));
  for (size_t i = 0; i < xs.size(); i += kLanes) {
    bf16 got[kLanes];
    vstore(got, vload(xs.data() + i));
    for (int j = 0; j < kLanes; ++j) {
      // AVX512-BF16's conversion reads float32 subnormals as zero (denormals-are-zero)
      const bool flushed = std::fabs(xs[i + j]) < std::numeric_limits<float>::min() && (got[j].bits & 0x7FFF) == 0;
      CHECK(got[j].bits == to_bf16(xs[i + j]).bits || flushed, "bf16(%g): %x vs %x", xs[i + j], got[j].bits,
            to_bf16(xs[i + j]).bits);
    }
    float back[kLanes];
    vstore(back, vload(got));
    for (int j = 0; j < kLanes; ++j)
      CHECK(std::isnan(back[j]) || back[j] == to_float(got[j]), "bf16 load %x", got[j].bits);
  }
  for (uint32_t h0 = 0; h0 < 65536; h0 += kLanes) {
    uint16_t h[kLanes];
    for (int j = 0; j < kLanes; ++j) h[j] = static_cast<uint16_t>(h0 + j);
    float got[kLanes];
    vstore(got, vload_half(h));
    for (int j = 0; j < kLanes; ++j) {
      const float want = half_to_float(h[j]);
      CHECK((std::isnan(want) && std::isnan(got[j])) || got[j] == want, "half %x: %g vs %g", h[j], got[j], want);
    }
  }
}

template <typename T, typename C = T>
static void test_attention(int64_t H, int64_t Hkv, int64_t D, float tol) {
  const int64_t B = 3, bs = 16, max_blocks = 5, num_blocks = 16;
  std::vector<int64_t> lens = {1, 37, 80}, table(B * max_blocks);
  for (auto& t : table) t = std::uniform_int_distribution<int64_t>(0, num_blocks - 1)(rng);
  auto q = random_vec<T>(B * H * D);
  auto k = random_vec<C>(num_blocks * bs * Hkv * D), v = random_vec<C>(k.size());
  std::vector<T> out_vec(q.size()), out_ref(q.size());
  DecodeAttention<T, C> a{q.data(), k.data(), v.data(), table.data(), lens.data(), out_vec.data(),
                       B, H, Hkv, D, bs, max_blocks, 1.f / std::sqrt(static_cast<float>(D))};
  decode_tasks(a, 0, B * Hkv);
  a.out = out_ref.data();
  decode_tasks(a, 0, B * Hkv, /*vector=*/false);
  for (size_t i = 0; i < q.size(); ++i)
    CHECK(close(to_float(out_vec[i]), to_float(out_ref[i]), tol, tol), "attention H=%ld Hkv=%ld D=%ld [%zu]: %g vs %g",
          (long)H, (long)Hkv, (long)D, i, to_float(out_vec[i]), to_float(out_ref[i]));
}

template <typename T>
static void test_rms_norm(int64_t D, float tol) {
  const int64_t N = 5;
  auto x = random_vec<T>(N * D), res = random_vec<T>(N * D), w = random_vec<T>(D);
  std::vector<T> h1(N * D), h2(N * D), o1(N * D), o2(N * D);
  add_rms_rows(x.data(), res.data(), h1.data(), w.data(), o1.data(), D, 1e-6f, 0, N);
  add_rms_rows(x.data(), res.data(), h2.data(), w.data(), o2.data(), D, 1e-6f, 0, N, /*vector=*/false);
  for (int64_t i = 0; i < N * D; ++i) {
    CHECK(to_float(h1[i]) == to_float(h2[i]), "rms residual D=%ld [%ld]", (long)D, (long)i);
    CHECK(close(to_float(o1[i]), to_float(o2[i]), tol, tol), "rms out D=%ld [%ld]: %g vs %g", (long)D, (long)i,
          to_float(o1[i]), to_float(o2[i]));
  }
}

template <typename T>
static void test_silu(int64_t I, float tol) {
  const int64_t N = 3;
  auto x = random_vec<T>(N * 2 * I, -8.f, 8.f);
  std::vector<T> o1(N * I), o2(N * I);
  silu_and_mul_rows(x.data(), o1.data(), I, 0, N);
  silu_and_mul_rows(x.data(), o2.data(), I, 0, N, /*vector=*/false);
  for (int64_t i = 0; i < N * I; ++i)
    CHECK(close(to_float(o1[i]), to_float(o2[i]), tol, tol), "silu I=%ld [%ld]: %g vs %g", (long)I, (long)i,
          to_float(o1[i]), to_float(o2[i]));
}

static void test_argmax() {
  for (int64_t V : {1, 7, 64, 1000, 4099}) {
    for (int trial = 0; trial < 6; ++trial) {
      std::vector<float> row(V);
      for (auto& x : row) x = std::floor(uniform(-4.f, 4.f));  // many ties
      if (trial == 1) row[V / 2] = std::nanf("");
      if (trial == 2) row[V - 1] = std::nanf("");
      if (trial == 3)
        for (auto& x : row) x = -std::numeric_limits<float>::infinity();
      if (trial == 4) row[V - 1] = 100.f;
      CHECK(argmax_vec(row.data(), V) == argmax_scalar(row.data(), V), "argmax V=%ld trial %d: %ld vs %ld", (long)V,
            trial, (long)argmax_vec(row.data(), V), (long)argmax_scalar(row.data(), V));
    }
  }
}

// Random units of format F for an (N, K) weight, written with gguf_repack.h's write_unit, and
// the weight they stand for (w[n][k] in double).
template <Fmt F>
static std::vector<uint8_t> random_weight(int64_t N, int64_t K, bool extreme, std::vector<double>& w) {
  using Fm = Format<F>;
  const int64_t NB = (N + 15) / 16, units = units_of(F, K), bb = block_bytes(F, K);
  std::vector<uint8_t> packed(NB * bb, 0);
  w.assign(N * units * Fm::kUnitCols, 0.0);
  const int max_code = Fm::kMaxCode;
  std::vector<Unit> all(NB * 16 * units);  // every row block's rows, padding rows zero
  for (int64_t n = 0; n < N; ++n)
    for (int64_t unit = 0; unit < units; ++unit) {
      Unit& v = all[(n / 16 * units + unit) * 16 + n % 16];
      for (int64_t k = 0; k < Fm::kUnitCols; ++k) {
        // extreme: 4-bit and K8 codes all at their largest; G8's at +-127 about its offset 128
        const int top = Fm::kMaxCode == 255 ? (k % 2 ? 255 : 1) : max_code;
        v.u[k] = static_cast<uint8_t>(extreme ? top : rng() % (max_code + 1));
      }
      v.scale = static_cast<uint16_t>(0x2000 + rng() % 0x800);  // halves ~ 0.008 .. 0.03
      v.min = static_cast<uint16_t>(0xA000 + rng() % 0x800);  // any negative half
      v.d = static_cast<uint16_t>(0x1800 + rng() % 0x800);  // ~ 0.0005 .. 0.002
      v.dmin = static_cast<uint16_t>(0x1800 + rng() % 0x800);
      for (int s = 0; s < 16; ++s) {
        v.sc[s] = static_cast<int8_t>(extreme ? 127 : static_cast<int>(rng() % 200) - 100);
        v.m[s] = static_cast<int8_t>(extreme ? -128 : static_cast<int>(rng() % 200) - 100);
      }
      write_unit<F>(v, n % 16, unit, packed.data() + n / 16 * bb);
      for (int64_t k = 0; k < Fm::kUnitCols; ++k) {
        double value;
        if (Fm::kTwoLevel) {
          const int h = Fm::kHalves == 2 ? static_cast<int>(k % 32 / 16) : 0, s = static_cast<int>(2 * (k / 32) + h);
          value = double(half_to_float(v.d)) * v.sc[s] * v.u[k] - double(half_to_float(v.dmin)) * v.m[s];
        } else {
          value = double(half_to_float(v.scale)) * v.u[k] + half_to_float(v.min);
        }
        w[n * units * Fm::kUnitCols + unit * Fm::kUnitCols + k] = value;
      }
    }
  // The loaders' writer, a row block's unit at a time, lays out the same bytes.
  std::vector<uint8_t> fast(packed.size(), 0xAB);
  for (int64_t nb = 0; nb < NB; ++nb)
    for (int64_t unit = 0; unit < units; ++unit)
      write_block_unit<F>(all.data() + (nb * units + unit) * 16, fast.data() + nb * bb + unit * Fm::kUnitBytes);
  CHECK(fast == packed, "write_block_unit fmt %d: not write_unit's layout", static_cast<int>(F));
  return packed;
}

// The quantized GEMM against a double oracle on the same int8 activations. extreme: every
// code and activation at the end of its range, where int16 partial sums are closest to
// overflowing (8 x 2 x 15 x 127, 2 x 2 x 63 x 127 and 2 x 127 x 127 < 2^15).
template <typename T, Fmt F>
static void test_quant_gemm(int64_t M, int64_t N, int64_t K, bool extreme = false) {
  const int64_t G = (K + 31) / 32, W = units_of(F, K) * Format<F>::kUnitCols;
  std::vector<double> w;
  const auto packed = random_weight<F>(N, K, extreme, w);
  auto x = random_vec<T>(M * K);
  if (extreme)
    for (size_t i = 0; i < x.size(); ++i) x[i] = from_float<T>((i / 2) % 2 ? 1.f : -1.f);  // every |a| = 127
  auto bias = random_vec<T>(N);
  QuantRows xs;
  xs.resize(M, G);
  for (int64_t m = 0; m < M; ++m) quantize_row(x.data() + m * K, K, xs, m);
  std::vector<T> y(M * N);
  gemm_blocks<T>(F, packed.data(), N, K, xs, bias.data(), y.data(), N, 0, (N + 15) / 16);
  double scale = 0.0;
  std::vector<double> want(M * N);
  for (int64_t m = 0; m < M; ++m)
    for (int64_t n = 0; n < N; ++n) {
      double sum = to_float(bias[n]);
      for (int64_t k = 0; k < K; ++k) sum += w[n * W + k] * double(xs.dx[k / 32 * M + m]) * xs.codes(k / 32, m)[k % 32];
      want[m * N + n] = sum;
      scale = std::max(scale, std::fabs(sum));
    }
  const float tol = std::is_same<T, bf16>::value ? 1e-2f : 1e-4f;
  for (int64_t i = 0; i < M * N; ++i)
    CHECK(close(to_float(y[i]), static_cast<float>(want[i]), tol * static_cast<float>(scale), tol),
          "quant gemm fmt %d M=%ld [%ld, %ld]: %g vs %g", static_cast<int>(F), (long)M, (long)(i / N), (long)(i % N),
          to_float(y[i]), want[i]);
}

template <typename T>
static void test_quant_gemm_all(int64_t M, bool extreme = false) {
  test_quant_gemm<T, Fmt::G4>(M, 40, 96, extreme);
  test_quant_gemm<T, Fmt::G8>(M, 45, 70, extreme);  // the last block's second register part-filled, K padded
  test_quant_gemm<T, Fmt::K4>(M, 33, 512, extreme);
  test_quant_gemm<T, Fmt::K8>(M, 20, 256, extreme);
}

// Activations to int8 per group of 32, vector path against the plain loop: bit for bit.
template <typename T>
static void test_quantize_row(int64_t K) {
  const int64_t G = (K + 31) / 32;
  auto x = random_vec<T>(K, -3.f, 3.f);
  for (int64_t k = 0; k < std::min<int64_t>(K, 32); ++k) x[k] = from_float<T>(0.f);  // an all-zero group
  if (K > 40) x[40] = from_float<T>(2.5f), x[41] = from_float<T>(-2.5f);  // ties at .5 after scaling, both signs
  QuantRows q;
  q.resize(2, G);
  quantize_row(x.data(), K, q, 1);  // the second row of two: the group-major layout's offsets
  for (int64_t g = 0; g < G; ++g) {
    const int64_t k0 = g * 32, n = std::min<int64_t>(32, K - k0), at = g * 2 + 1;
    float amax = 0.f;
    for (int64_t k = 0; k < n; ++k) amax = std::max(amax, std::fabs(to_float(x[k0 + k])));
    const float d = amax / 127.f, id = amax > 0.f ? 127.f / amax : 0.f;
    int32_t sum[2] = {0, 0};
    for (int64_t k = 0; k < n; ++k) {
      const int32_t want = static_cast<int32_t>(std::nearbyint(to_float(x[k0 + k]) * id));
      CHECK(q.codes(g, 1)[k] == want, "quantize K=%ld [%ld]: %d vs %d", (long)K, (long)(k0 + k), q.codes(g, 1)[k], want);
      sum[k / 16] += want;
    }
    CHECK(q.dx[at] == d && q.sx[at] == d * static_cast<float>(sum[0] + sum[1]) &&
              q.sh[2 * at] == d * static_cast<float>(sum[0]) && q.sh[2 * at + 1] == d * static_cast<float>(sum[1]),
          "quantize K=%ld group %ld scales", (long)K, (long)g);
    CHECK(q.codes(g, 0)[0] == 0 && q.dx[g * 2] == 0.f, "quantize K=%ld wrote the other row", (long)K);
  }
}

// Rotary + cache write, vector path against the scalar one: bit for bit (both round as the
// eager ops do).
template <typename T, typename C = T>
static void test_rotary(int64_t H, int64_t Hkv, int64_t D) {
  const int64_t N = 3, slots_n = 40;
  auto qkv = random_vec<T>(N * (H + 2 * Hkv) * D), cos = random_vec<T>(N * D / 2, -1.f, 1.f),
       sin = random_vec<T>(N * D / 2, -1.f, 1.f);
  std::vector<int64_t> slots = {7, 0, 39};
  std::vector<C> k1(slots_n * Hkv * D), v1(k1.size()), k2(k1.size()), v2(k1.size());
  std::vector<T> q1(N * H * D), q2(q1.size());
  rotary_kv_write_rows(qkv.data(), cos.data(), sin.data(), k1.data(), v1.data(), slots.data(), q1.data(), H, Hkv, D, 0, N);
  rotary_kv_write_rows(qkv.data(), cos.data(), sin.data(), k2.data(), v2.data(), slots.data(), q2.data(), H, Hkv, D, 0, N,
                       /*vector=*/false);
  for (size_t i = 0; i < q1.size(); ++i) CHECK(to_float(q1[i]) == to_float(q2[i]), "rotary q D=%ld [%zu]", (long)D, i);
  for (size_t i = 0; i < k1.size(); ++i)
    CHECK(to_float(k1[i]) == to_float(k2[i]) && to_float(v1[i]) == to_float(v2[i]), "rotary cache D=%ld [%zu]", (long)D, i);
}

int main() {
  test_exp();
  test_bf16_and_half();
  for (int64_t D : {32, 64, 128, 256, 48}) {
    test_attention<float>(8, 2, D, 1e-4f);
    test_attention<bf16>(9, 3, D, 2e-2f);
    test_attention<float, bf16>(9, 3, D, 1e-4f);  // a bf16 cache under float32 activations
    test_attention<float>(4, 4, D, 1e-4f);
  }
  for (int64_t D : {64, 576, 20}) {
    test_rms_norm<float>(D, 1e-5f);
    test_rms_norm<bf16>(D, 1e-2f);
  }
  for (int64_t I : {64, 1536, 13}) {
    test_silu<float>(I, 1e-5f);
    test_silu<bf16>(I, 1e-2f);
  }
  test_argmax();
  for (int64_t D : {64, 128, 16, 12}) {
    test_rotary<float>(4, 2, D);
    test_rotary<float, bf16>(4, 2, D);  // a bf16 cache under float32 activations
    test_rotary<bf16>(9, 3, D);
  }
  for (int64_t K : {32, 96, 576, 70}) {
    test_quantize_row<float>(K);
    test_quantize_row<bf16>(K);
  }
  // Rows: one pass on all registers (1-3), one register per pass with tails (4-19), and a
  // prefill in chunks of rows (130 rows of K = 4096: chunks of 64).
  for (int64_t M : {1, 2, 3, 4, 6, 9, 19}) {
    test_quant_gemm_all<float>(M);
    test_quant_gemm_all<bf16>(M);
    test_quant_gemm_all<float>(M, /*extreme=*/true);
  }
  test_quant_gemm<float, Fmt::K4>(130, 24, 4096);
  test_quant_gemm<float, Fmt::G8>(130, 17, 4096);
  if (failures) {
    std::printf("%d failures (%s)\n", failures, kIsa);
    return 1;
  }
  std::printf("ok %s %s\n", kIsa, isa_extensions());
  return 0;
}
