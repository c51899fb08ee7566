// Greedy sampling's argmax over each row of the logits, on the CPU.
//
//   logits : (B, V) float32, contiguous  ->  (B,) int64
//
// torch's argmax over the last dimension ran at ~0.8 G values/s here (1.8 ms for 32 rows of
// a 49,152-token vocabulary, 5% of a decode step at 32 sequences); 16 lanes of running
// maxima and their indices stream the row at memory speed instead. Same answer as torch:
// the first index of the maximum, and a NaN counts as the maximum (its first index wins).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <cmath>
#include <limits>

#include "vec512.h"

namespace {

int64_t argmax_scalar(const float* row, int64_t V) {
  int64_t best = 0;
  for (int64_t v = 0; v < V; ++v) {
    if (std::isnan(row[v])) return v;
    if (row[v] > row[best]) best = v;
  }
  return best;
}

#ifdef R1SERVE_VEC512
int64_t argmax_vec(const float* row, int64_t V) {
  __m512 best = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
  __m512i best_at = _mm512_set1_epi32(0);
  __m512i at = _mm512_setr_epi32(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15);
  const __m512i step = _mm512_set1_epi32(16);
  __mmask16 nan = 0;
  int64_t v = 0;
  for (; v + 16 <= V; v += 16) {
    const __m512 x = _mm512_loadu_ps(row + v);
    nan |= _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    const __mmask16 gt = _mm512_cmp_ps_mask(x, best, _CMP_GT_OQ);  // strictly greater: earlier index kept
    best = _mm512_mask_mov_ps(best, gt, x);
    best_at = _mm512_mask_mov_epi32(best_at, gt, at);
    at = _mm512_add_epi32(at, step);
  }
  if (nan) return argmax_scalar(row, V);
  float lanes[16];
  int32_t idx[16];
  _mm512_storeu_ps(lanes, best);
  _mm512_storeu_si512(idx, best_at);
  float m = lanes[0];
  int64_t i = idx[0];
  for (int j = 1; j < 16; ++j)
    if (lanes[j] > m || (lanes[j] == m && idx[j] < i)) m = lanes[j], i = idx[j];
  for (; v < V; ++v) {  // the tail, after every vector index
    if (std::isnan(row[v])) return v;
    if (row[v] > m) m = row[v], i = v;
  }
  return i;  // a row of only -inf keeps index 0, as torch does
}
#endif

}  // namespace

at::Tensor argmax_rows(const at::Tensor& logits) {
  TORCH_CHECK(logits.dim() == 2 && logits.is_contiguous() && logits.scalar_type() == at::kFloat && logits.size(1) > 0,
              "argmax_rows: logits must be a contiguous non-empty float32 (B, V); got ", logits.sizes(), " ",
              logits.scalar_type());
  TORCH_CHECK(logits.size(1) < (int64_t(1) << 31), "argmax_rows: vocabulary too large for int32 lane indices");
  const int64_t B = logits.size(0), V = logits.size(1);
  at::Tensor out = at::empty({B}, logits.options().dtype(at::kLong));
  const float* lp = logits.data_ptr<float>();
  int64_t* op = out.data_ptr<int64_t>();
  at::parallel_for(0, B, 1, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b) {
#ifdef R1SERVE_VEC512
      op[b] = argmax_vec(lp + b * V, V);
#else
      op[b] = argmax_scalar(lp + b * V, V);
#endif
    }
  });
  return out;
}
