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
      add_rms_rows<scalar_t>(xp, rp, hp, wp, op, D, static_cast<float>(eps), r0, r1);
    });
  });
  return {out, h};
}
