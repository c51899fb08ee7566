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

#include <cmath>

#include "vec512.h"

namespace {

template <typename T>
inline float silu_mul(float g, float up) {
  const float silu = static_cast<float>(static_cast<T>(g / (1.f + std::exp(-g))));
  return silu * up;
}

#ifdef R1SERVE_VEC512
using namespace r1serve_vec;

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
#endif

template <typename T>
int64_t silu_mul_vec(const T*, const T*, T*, int64_t) {
  return 0;
}
#ifdef R1SERVE_VEC512
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
