// Residual add + RMSNorm in one pass over each row, on the CPU.
//
//   h   = x + residual                (the new residual stream, returned too)
//   out      =  weight * residual / sqrt(mean(residual^2) + eps)
//
// Statistics in float32, as the reference implementation computes them.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <optional>
#include <tuple>

#include "vec512.h"

template <typename T>
static void add_rms_rows(const T* x, const T* res, T* h, const T* w, T* out, int64_t D, float eps, int64_t r0,
                         int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    T* rr = h + r * D;
    float ss = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      const float v = x ? static_cast<float>(x[r * D + d]) + static_cast<float>(res[r * D + d])
                        : static_cast<float>(res[r * D + d]);
      rr[d] = static_cast<T>(v);
      const float rounded = static_cast<float>(rr[d]);  // the stored value, as the reference sees it
      ss += rounded * rounded;
    }
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t d = 0; d < D; ++d)
      out[r * D + d] = static_cast<T>(static_cast<float>(w[d]) * static_cast<float>(static_cast<T>(static_cast<float>(rr[d]) * inv)));
  }
}

#ifdef R1SERVE_VEC512
using namespace r1serve_vec;

// The same row 16 values at a time (D % 16 == 0); the residual stream is rounded to T before
// it is squared, as above, so both paths store identical residuals.
template <typename T>
static void add_rms_rows_vec(const T* x, const T* res, T* h, const T* w, T* out, int64_t D, float eps, int64_t r0,
                             int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    T* rr = h + r * D;
    __m512 ss = _mm512_setzero_ps();
    for (int64_t d = 0; d < D; d += 16) {
      __m512 v = load16(res + r * D + d);
      if (x) v = round_to(_mm512_add_ps(load16(x + r * D + d), v), rr);
      store16(rr + d, v);
      ss = _mm512_fmadd_ps(v, v, ss);
    }
    const __m512 inv = _mm512_set1_ps(1.f / std::sqrt(_mm512_reduce_add_ps(ss) / static_cast<float>(D) + eps));
    for (int64_t d = 0; d < D; d += 16)
      store16(out + r * D + d, _mm512_mul_ps(load16(w + d), round_to(_mm512_mul_ps(load16(rr + d), inv), rr)));
  }
}

template <typename T>
static bool add_rms_rows_fast(const T* x, const T* res, T* h, const T* w, T* out, int64_t D, float eps, int64_t r0,
                              int64_t r1) {
  if (D % 16) return false;
  add_rms_rows_vec<T>(x, res, h, w, out, D, eps, r0, r1);
  return true;
}
template <>
bool add_rms_rows_fast<double>(const double*, const double*, double*, const double*, double*, int64_t, float, int64_t,
                               int64_t) {
  return false;
}
#else
template <typename T>
static bool add_rms_rows_fast(const T*, const T*, T*, const T*, T*, int64_t, float, int64_t, int64_t) {
  return false;
}
#endif

// x may be None (no add): then residual is only normalised and returned as h.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const std::optional<at::Tensor>& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  TORCH_CHECK(residual.is_contiguous() && residual.dim() == 2, "add_rms_norm: residual must be a contiguous (N, D)");
  const bool add = x.has_value();
  const int64_t N = residual.size(0), D = residual.size(1);
  at::Tensor out = at::empty_like(residual);
  at::Tensor h = add ? at::empty_like(residual) : residual;
  const at::Tensor xc = add ? x->contiguous() : residual;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, residual.scalar_type(), "add_rms_norm", [&] {
    const scalar_t* xp = add ? xc.data_ptr<scalar_t>() : nullptr;
    const scalar_t* rp = residual.data_ptr<scalar_t>();
    scalar_t* hp = h.data_ptr<scalar_t>();
    const scalar_t* wp = weight.data_ptr<scalar_t>();
    scalar_t* op = out.data_ptr<scalar_t>();
    at::parallel_for(0, N, 16, [&](int64_t r0, int64_t r1) {
      if (!add_rms_rows_fast<scalar_t>(xp, rp, hp, wp, op, D, static_cast<float>(eps), r0, r1))
        add_rms_rows<scalar_t>(xp, rp, hp, wp, op, D, static_cast<float>(eps), r0, r1);
    });
  });
  return {out, h};
}
