// The attention layer's input side in one pass: split the fused q/k/v projection, apply the
// rotary embedding (rotate-half form) to q and k, and store k and v in the paged KV cache.
// The kernel's core, without ATen.
//
//   qkv      : (N, (H + 2 Hkv) D)  rows [q heads | k heads | v heads]
//   cos, sin : (N, D/2)            this step's positions, in qkv's dtype
//   k_cache, v_cache : (num_blocks * block_size, Hkv, D) slots, of C (T, or bf16 under float32)
//   slots    : (N,) int64          token n's cache slot
//   -> q     : (N, H, D) rotated
//
// Each product and difference is rounded to the dtype as the eager ops round them (then to
// the cache's, as a copy into it rounds), and no multiply-add is fused (this file is built
// with fp-contract off), so the result is bit-identical to the torch twin on the vector
// path and the scalar one alike.
#pragma once

#pragma GCC optimize("fp-contract=off")

#include <algorithm>
#include <cstdint>

#include "vec.h"

namespace r1serve_kernels {
using namespace r1serve_vec;

template <typename T>
inline float rounded(float v) {  // round to T, as an eager op producing a T tensor does
  return to_float(from_float<T>(v));
}

// out = [x1 cos - x2 sin | x2 cos + x1 sin] for one head of 2 * half values, computed in T
// and stored as O.
template <typename T, typename O>
inline void rotate_half(const T* x, const T* cos, const T* sin, O* out, int64_t half, bool vector) {
  const T* like = x;  // rounds products and differences to T, as the eager ops do
  int64_t i = 0;
  for (; vector && i + kLanes <= half; i += kLanes) {
    const vf x1 = vload(x + i), x2 = vload(x + i + half), c = vload(cos + i), s = vload(sin + i);
    vstore(out + i, vround(vsub(vround(vmul(x1, c), like), vround(vmul(x2, s), like)), like));
    vstore(out + i + half, vround(vadd(vround(vmul(x2, c), like), vround(vmul(x1, s), like)), like));
  }
  for (; i < half; ++i) {
    const float x1 = to_float(x[i]), x2 = to_float(x[i + half]), c = to_float(cos[i]), s = to_float(sin[i]);
    out[i] = from_float<O>(rounded<T>(rounded<T>(x1 * c) - rounded<T>(x2 * s)));
    out[i + half] = from_float<O>(rounded<T>(rounded<T>(x2 * c) + rounded<T>(x1 * s)));
  }
}

// Tokens n0..n1; `vector` false forces the scalar path (for tests).
template <typename T, typename C>
void rotary_kv_write_rows(const T* qkv, const T* cos, const T* sin, C* k_cache, C* v_cache, const int64_t* slots,
                          T* q, int64_t H, int64_t Hkv, int64_t D, int64_t n0, int64_t n1, bool vector = true) {
  const int64_t half = D / 2, width = (H + 2 * Hkv) * D;
  for (int64_t n = n0; n < n1; ++n) {
    const T* row = qkv + n * width;
    const T *c = cos + n * half, *s = sin + n * half;
    for (int64_t h = 0; h < H; ++h) rotate_half(row + h * D, c, s, q + (n * H + h) * D, half, vector);
    C* k_dst = k_cache + slots[n] * Hkv * D;
    C* v_dst = v_cache + slots[n] * Hkv * D;
    for (int64_t h = 0; h < Hkv; ++h) rotate_half(row + (H + h) * D, c, s, k_dst + h * D, half, vector);
    const T* v = row + (H + Hkv) * D;
    int64_t i = 0;
    for (; vector && i + kLanes <= Hkv * D; i += kLanes) vstore(v_dst + i, vload(v + i));
    for (; i < Hkv * D; ++i) v_dst[i] = from_float<C>(to_float(v[i]));
  }
}

}  // namespace r1serve_kernels
