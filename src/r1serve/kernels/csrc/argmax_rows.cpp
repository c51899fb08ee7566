// ATen glue of the greedy argmax (the kernel is argmax_rows.h).
//
//   logits : (B, V) float32, contiguous  ->  (B,) int64
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "argmax_rows.h"

at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kFloat && logits.size(1) > 0,
              "argmax_rows: logits must be a contiguous non-empty float32 (B, V); got ", logits.sizes(), " ",
              logits.scalar_type());
  const int64_t B = logits.size(0), V = logits.size(1);
  at::Tensor out = at::empty({B}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) op[b] = r1serve_kernels::argmax_vec(lp + b * V, V);
  });
  return out;
}
