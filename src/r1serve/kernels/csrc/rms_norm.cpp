// ATen glue of the fused residual add + RMSNorm (the kernel is rms_norm.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <optional>
#include <tuple>

#include "aten_types.h"
#include "rms_norm.h"

template <typename T>
static void norm(const at::Tensor* x, const at::Tensor& residual, at::Tensor& h, const at::Tensor& weight,
                 at::Tensor& out, double eps) {
  using S = r1serve_vec_t<T>;
  const S* xp = x ? as_vec<T>(*x) : nullptr;
  const S *rp = as_vec<T>(residual), *wp = as_vec<T>(weight);
  S *hp = as_vec_mut<T>(h), *op = as_vec_mut<T>(out);
  const int64_t D = residual.size(1);
  at::parallel_for(0, residual.size(0), 16, [&](int64_t r0, int64_t r1) {
    r1serve_kernels::add_rms_rows(xp, rp, hp, wp, op, D, static_cast<float>(eps), r0, r1);
  });
}

// x may be None (no add): then residual is only normalised and returned as h.
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const std::optional<at::Tensor>& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps) {
  TORCH_CHECK(residual.is_contiguous() && residual.dim() == 2, "add_rms_norm: residual must be a contiguous (N, D)");
  TORCH_CHECK(weight.is_contiguous() && weight.numel() == residual.size(1) &&
                  weight.scalar_type() == residual.scalar_type(),
              "add_rms_norm: weight must be a contiguous (D,) of the residual's dtype");
  TORCH_CHECK(!x || (x->sizes() == residual.sizes() && x->scalar_type() == residual.scalar_type()),
              "add_rms_norm: x must match the residual's shape and dtype");
  const bool add = x.has_value();
  at::Tensor out = at::empty_like(residual);
  at::Tensor h = add ? at::empty_like(residual) : residual;
  const at::Tensor xc = add ? x->contiguous() : residual;
  if (residual.scalar_type() == at::kBFloat16)
    norm<at::BFloat16>(add ? &xc : nullptr, residual, h, weight, out, eps);
  else if (residual.scalar_type() == at::kFloat)
    norm<float>(add ? &xc : nullptr, residual, h, weight, out, eps);
  else
    TORCH_CHECK(false, "add_rms_norm supports float32 and bfloat16, got ", residual.scalar_type());
  return {out, h};
}
