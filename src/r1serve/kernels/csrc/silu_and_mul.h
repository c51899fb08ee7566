// The gated MLP's activation, silu(gate) * up, in one pass over the fused gate/up output:
// the kernel's core, without ATen.
//
//   x : (N, 2I) rows [gate | up]  ->  (N, I)
//
// Computed in float32 and rounded to the dtype where the eager ops round (after silu, after
// the multiply). The vector exp is a Cephes polynomial (~2 ulp of float32; the scalar C
// library exp made the kernel 2x slower than the eager ops at I = 1536).
#pragma once

#include <cmath>
#include <cstdint>

#include "vec.h"

namespace r1serve_kernels {
using namespace r1serve_vec;

template <typename T>
inline float silu_mul_scalar(float g, float up) {
  return to_float(from_float<T>(g / (1.f + std::exp(-g)))) * up;
}

// Rows n0..n1; `vector` false forces the scalar path.
template <typename T>
void silu_and_mul_rows(const T* x, T* out, int64_t I, int64_t n0, int64_t n1, bool vector = true) {
  for (int64_t n = n0; n < n1; ++n) {
    const T *gate = x + n * 2 * I, *up = gate + I;
    T* o = out + n * I;
    int64_t i = 0;
    for (; vector && i + kLanes <= I; i += kLanes) {
      const vf g = vload(gate + i);
      const vf silu = vround(vdiv(g, vadd(vset1(1.f), vexp(vsub(vzero(), g)))), o);
      vstore(o + i, vmul(silu, vload(up + i)));
    }
    for (; i < I; ++i) o[i] = from_float<T>(silu_mul_scalar<T>(to_float(gate[i]), to_float(up[i])));
  }
}

}  // namespace r1serve_kernels
