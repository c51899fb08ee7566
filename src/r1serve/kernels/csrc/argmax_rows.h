// Greedy sampling's argmax over one row of float32 logits: the kernel's core, without ATen.
//
// torch's argmax over the last dimension ran at ~0.8 G values/s (1.8 ms for 32 rows of a
// 49,152-token vocabulary, 5% of a decode step at 32 sequences); a register of running
// maxima and their indices streams the row at memory speed instead. Same answer as torch:
// the first index of the maximum, and a NaN counts as the maximum (its first index wins).
#pragma once

#include <cmath>
#include <cstdint>
#include <limits>

#include "vec.h"

namespace r1serve_kernels {
using namespace r1serve_vec;

inline int64_t argmax_scalar(const float* row, int64_t V) {
  int64_t best = 0;
  for (int64_t v = 0; v < V; ++v) {
    if (std::isnan(row[v])) return v;
    if (row[v] > row[best]) best = v;
  }
  return best;
}

// Indices ride in float lanes: exact below 2^24, which every vocabulary is (larger rows go
// the scalar way).
inline int64_t argmax_vec(const float* row, int64_t V) {
  if (V >= (int64_t(1) << 24)) return argmax_scalar(row, V);
  float iota[kLanes];
  for (int i = 0; i < kLanes; ++i) iota[i] = static_cast<float>(i);
  vf best = vset1(-std::numeric_limits<float>::infinity()), best_at = vzero(), index = vload(iota);
  const vf step = vset1(static_cast<float>(kLanes));
  int64_t v = 0;
  for (; v + kLanes <= V; v += kLanes) {
    const vf x = vload(row + v);
    if (vany(visnan(x))) return argmax_scalar(row, V);
    const vmask gt = vgt(x, best);  // strictly greater: the earlier index is kept
    best = vselect(gt, x, best);
    best_at = vselect(gt, index, best_at);
    index = vadd(index, step);
  }
  float lanes[kLanes], idx[kLanes];
  vstore(lanes, best);
  vstore(idx, best_at);
  float m = lanes[0];
  int64_t i = static_cast<int64_t>(idx[0]);
  for (int j = 1; j < kLanes; ++j)
    if (lanes[j] > m || (lanes[j] == m && static_cast<int64_t>(idx[j]) < i)) m = lanes[j], i = static_cast<int64_t>(idx[j]);
  for (; v < V; ++v) {  // the tail, after every vector index
    if (std::isnan(row[v])) return v;
    if (row[v] > m) m = row[v], i = v;
  }
  return i;  // a row of only -inf keeps index 0, as torch does
}

}  // namespace r1serve_kernels
