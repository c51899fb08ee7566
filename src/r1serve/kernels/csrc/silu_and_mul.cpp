// The gated MLP's activation, silu(gate) * up, in one pass over the fused gate/up output.
//
//   x : (N, 2I) rows [gate | up]  ->  (N, I)
//
// Eagerly it is a chunk, a silu and a multiply, each allocating and sweeping memory; at one
// decoded token the op overheads are most of the cost. Computed in float32 and rounded to
// the dtype where the eager ops round (after silu, after the multiply). With AVX512 the exp
// is a vectorised Cephes polynomial (~2 ulp of float32; the scalar C library exp made the
// kernel 2x slower than the eager ops at I = 1536).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <immintrin.h>

#include <cmath>

namespace {

template <typename T>
inline float silu_mul(float g, float up) {
  const float silu = static_cast<float>(static_cast<T>(g / (1.f + std::exp(-g))));
  return silu * up;
}

#if defined(__AVX512F__) && defined(__AVX512BF16__)
// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two for precision).
inline __m512 exp512(__m512 x) {
  x = _mm512_min_ps(_mm512_max_ps(x, _mm512_set1_ps(-87.3f)), _mm512_set1_ps(88.3f));
  const __m512 n = _mm512_roundscale_ps(_mm512_mul_ps(x, _mm512_set1_ps(1.44269504088896341f)),
                                        _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC);
  __m512 r = _mm512_fnmadd_ps(n, _mm512_set1_ps(0.693359375f), x);
  r = _mm512_fnmadd_ps(n, _mm512_set1_ps(-2.12194440e-4f), r);
  __m512 p = _mm512_set1_ps(1.9875691500e-4f);
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.3981999507e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(8.3334519073e-3f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(4.1665795894e-2f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(1.6666665459e-1f));
  p = _mm512_fmadd_ps(p, r, _mm512_set1_ps(5.0000001201e-1f));
  p = _mm512_fmadd_ps(p, _mm512_mul_ps(r, r), _mm512_add_ps(r, _mm512_set1_ps(1.f)));
  return _mm512_scalef_ps(p, n);
}

inline __m512 load16(const float* p) { return _mm512_loadu_ps(p); }
inline __m512 load16(const at::BFloat16* p) {  // bf16 -> float is a 16-bit shift
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline __m512 round_to(__m512 v, const float*) { return v; }
inline __m512 round_to(__m512 v, const at::BFloat16*) {  // to bf16 and back, as an eager bf16 op's output
  const __m256i h = reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline void store16(float* p, __m512 v) { _mm512_storeu_ps(p, v); }
inline void store16(at::BFloat16* p, __m512 v) {
  _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v)));
}

// 16 values at a time; returns how many it did (the rest go the scalar way).
template <typename T>
int64_t silu_mul16(const T* gate, const T* up, T* out, int64_t I) {
  int64_t i = 0;
  for (; i + 16 <= I; i += 16) {
    const __m512 g = load16(gate + i);
    const __m512 e = exp512(_mm512_sub_ps(_mm512_setzero_ps(), g));
    const __m512 silu = round_to(_mm512_div_ps(g, _mm512_add_ps(_mm512_set1_ps(1.f), e)), out);
    store16(out + i, _mm512_mul_ps(silu, load16(up + i)));
  }
  return i;
}
#define R1SERVE_SILU_VEC 1
#endif

template <typename T>
int64_t silu_mul_vec(const T*, const T*, T*, int64_t) {
  return 0;
}
#ifdef R1SERVE_SILU_VEC
template <>
int64_t silu_mul_vec<float>(const float* gate, const float* up, float* out, int64_t I) {
  return silu_mul16(gate, up, out, I);
}
template <>
int64_t silu_mul_vec<at::BFloat16>(const at::BFloat16* gate, const at::BFloat16* up, at::BFloat16* out, int64_t I) {
  return silu_mul16(gate, up, out, I);
}
#endif

template <typename T>
void silu_and_mul_rows(const T* x, T* out, int64_t I, int64_t n0, int64_t n1) {
  for (int64_t n = n0; n < n1; ++n) {
    const T *gate = x + n * 2 * I, *up = gate + I;
    T* o = out + n * I;
    for (int64_t i = silu_mul_vec(gate, up, o, I); i < I; ++i) o[i] = static_cast<T>(silu_mul<T>(gate[i], up[i]));
  }
}

}  // namespace

at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0,
              "silu_and_mul: x must be a contiguous (N, 2I); got ", x.sizes());
  const int64_t N = x.size(0), I = x.size(1) / 2;
  at::Tensor out = at::empty({N, I}, x.options());
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, x.scalar_type(), "silu_and_mul", [&] {
    // A few rows (decode) are not worth waking a second thread for.
    at::parallel_for(0, N, 8, [&](int64_t n0, int64_t n1) {
      silu_and_mul_rows<scalar_t>(x.data_ptr<scalar_t>(), out.data_ptr<scalar_t>(), I, n0, n1);
    });
  });
  return out;
}
