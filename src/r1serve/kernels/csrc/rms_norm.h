// Residual add + RMSNorm in one pass over each row: the kernel's core, without ATen.
//
//   h   = x + residual                (the new residual stream, returned too)
//   out = weight * h / sqrt(mean(h^2) + eps)
//
// Statistics in float32, as the reference implementation computes them. The residual
// stream is rounded to T before it is squared, on both paths, so they store identical
// residuals (bit-identical to the twin's).
#pragma once

#include <cmath>
#include <cstdint>

#include "vec.h"

namespace r1serve_kernels {
using namespace r1serve_vec;

template <typename T>
void add_rms_rows_scalar(const T* x, const T* res, T* h, const T* w, T* out, int64_t D, float eps, int64_t r0,
                         int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    T* rr = h + r * D;
    float ss = 0.f;
    for (int64_t d = 0; d < D; ++d) {
      const float v = x ? to_float(x[r * D + d]) + to_float(res[r * D + d]) : to_float(res[r * D + d]);
      rr[d] = from_float<T>(v);
      const float rounded = to_float(rr[d]);  // the stored value, as the reference sees it
      ss += rounded * rounded;
    }
    const float inv = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
    for (int64_t d = 0; d < D; ++d)
      out[r * D + d] = from_float<T>(to_float(w[d]) * to_float(from_float<T>(to_float(rr[d]) * inv)));
  }
}

// The same, a register at a time (D a whole number of registers).
template <typename T>
void add_rms_rows_vec(const T* x, const T* res, T* h, const T* w, T* out, int64_t D, float eps, int64_t r0,
                      int64_t r1) {
  for (int64_t r = r0; r < r1; ++r) {
    T* rr = h + r * D;
    vf ss = vzero();
    for (int64_t d = 0; d < D; d += kLanes) {
      vf v = vload(res + r * D + d);
      if (x) v = vround(vadd(vload(x + r * D + d), v), rr);
      vstore(rr + d, v);
      ss = vfmadd(v, v, ss);
    }
    const vf inv = vset1(1.f / std::sqrt(vhsum(ss) / static_cast<float>(D) + eps));
    for (int64_t d = 0; d < D; d += kLanes)
      vstore(out + r * D + d, vmul(vload(w + d), vround(vmul(vload(rr + d), inv), rr)));
  }
}

// Rows r0..r1 of (N, D); x may be null (no add: h is res). `vector` false forces the scalar path.
template <typename T>
void add_rms_rows(const T* x, const T* res, T* h, const T* w, T* out, int64_t D, float eps, int64_t r0, int64_t r1,
                  bool vector = true) {
  if (vector && D % kLanes == 0)
    add_rms_rows_vec(x, res, h, w, out, D, eps, r0, r1);
  else
    add_rms_rows_scalar(x, res, h, w, out, D, eps, r0, r1);
}

}  // namespace r1serve_kernels
