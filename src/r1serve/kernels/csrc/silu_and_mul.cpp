// ATen glue of silu(gate) * up (the kernel is silu_and_mul.h). Eagerly it is a chunk, a
// silu and a multiply, each allocating and sweeping memory; at one decoded token the op
// overheads are most of the cost.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "aten_types.h"
#include "silu_and_mul.h"

template <typename T>
static void rows(const at::Tensor& x, at::Tensor& out) {
  const int64_t I = out.size(1);
  const auto* xp = as_vec<T>(x);
  auto* op = as_vec_mut<T>(out);
  // A few rows (decode) are not worth waking a second thread for.
  at::parallel_for(0, x.size(0), 8, [&](int64_t n0, int64_t n1) { r1serve_kernels::silu_and_mul_rows(xp, op, I, n0, n1); });
}

at::Tensor silu_and_mul(const at::Tensor& x) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && x.size(1) % 2 == 0,
              "silu_and_mul: x must be a contiguous (N, 2I); got ", x.sizes());
  at::Tensor out = at::empty({x.size(0), x.size(1) / 2}, x.options());
  if (x.scalar_type() == at::kBFloat16)
    rows<at::BFloat16>(x, out);
  else if (x.scalar_type() == at::kFloat)
    rows<float>(x, out);
  else
    TORCH_CHECK(false, "silu_and_mul supports float32 and bfloat16, got ", x.scalar_type());
  return out;
}
