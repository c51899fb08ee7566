// Decode attention read straight from the paged KV cache, on the CPU.
//
// One task per (sequence, KV head). The G query heads that share the KV head are handled
// together, so every key and value row is loaded once per group, in place: no gather of
// the context into a padded batch, no dtype conversion pass over it.
//
//   k_cache, v_cache : (num_blocks, block_size, num_kv_heads, head_dim)   float or bf16
//   q, out           : (B, num_heads, head_dim)
//   block_tables     : (B, max_blocks) int64     seq_lens : (B,) int64
//
// Two passes per task: scores = q.K for all L positions (kept in a float buffer), then
// softmax and the weighted sum of V. Accumulation is in float32.
//
// With AVX512 and head_dim a multiple of 16 up to 256 (every model r1serve serves), a row
// is head_dim/16 registers: each key row is converted once and dotted with the G query
// heads, the exp is vectorised, and each head's output stays in registers while V streams
// by. The scalar path (other CPUs, other head sizes) computes the same thing; the vector one
// was 6-8x faster at 32 sequences, where attention had been a third of a decode step.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

#include "vec512.h"

// Dot product written as 16 independent lanes, so the compiler vectorises it without
// being allowed to reorder float additions (no -ffast-math).
static inline float dot(const float* a, const float* b, int64_t n) {
  float lanes[16] = {0.f};
  int64_t d = 0;
  for (; d + 16 <= n; d += 16)
    for (int j = 0; j < 16; ++j) lanes[j] += a[d + j] * b[d + j];
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += lanes[j];
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

template <typename T>
static inline void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t d = 0; d < n; ++d) dst[d] = static_cast<float>(src[d]);
}

template <typename T>
static void decode_task(const T* q, const T* k_cache, const T* v_cache, const int64_t* table, int64_t L,
                        T* out, int64_t b, int64_t h, int64_t H, int64_t Hkv, int64_t D, int64_t bs, float scale,
                        std::vector<float>& qf, std::vector<float>& scores, std::vector<float>& acc,
                        std::vector<float>& row) {
  const int64_t G = H / Hkv;
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) qf[g * D + d] = static_cast<float>(q[(b * H + h * G + g) * D + d]) * scale;
  for (int64_t t = 0; t < L; ++t) {  // pass 1: scores (G, L)
    to_float(k_cache + ((table[t / bs] * bs + t % bs) * Hkv + h) * D, row.data(), D);  // once for all G heads
    for (int64_t g = 0; g < G; ++g) scores[g * L + t] = dot(qf.data() + g * D, row.data(), D);
  }
  for (int64_t g = 0; g < G; ++g) {  // softmax over each head's row
    float m = -std::numeric_limits<float>::infinity(), sum = 0.f;
    for (int64_t t = 0; t < L; ++t) m = std::max(m, scores[g * L + t]);
    for (int64_t t = 0; t < L; ++t) sum += (scores[g * L + t] = std::exp(scores[g * L + t] - m));
    for (int64_t t = 0; t < L; ++t) scores[g * L + t] /= sum;
  }
  std::fill(acc.begin(), acc.end(), 0.f);
  for (int64_t t = 0; t < L; ++t) {  // pass 2: out = P @ V
    to_float(v_cache + ((table[t / bs] * bs + t % bs) * Hkv + h) * D, row.data(), D);
    for (int64_t g = 0; g < G; ++g) {
      const float p = scores[g * L + t];
      float* a = acc.data() + g * D;
      for (int64_t d = 0; d < D; ++d) a[d] += p * row[d];
    }
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) out[(b * H + h * G + g) * D + d] = static_cast<T>(acc[g * D + d]);
}

#ifdef R1SERVE_VEC512
using namespace r1serve_vec;

// One (sequence, KV head) task with D = 16 NV. scores holds G rows of ceil(L / 16) * 16.
template <typename T, int NV>
static void decode_task_vec(const T* q, const T* k_cache, const T* v_cache, const int64_t* table, int64_t L,
                            T* out, int64_t b, int64_t h, int64_t H, int64_t Hkv, int64_t bs, float scale,
                            float* qf, float* scores, int64_t ld) {
  constexpr int64_t D = 16 * NV;
  const int64_t G = H / Hkv, row_stride = Hkv * D;
  if (L <= 0) {  // an empty context attends to nothing: zeros, as the scalar path gives
    for (int64_t g = 0; g < G; ++g) std::fill_n(out + (b * H + h * G + g) * D, D, T(0));
    return;
  }
  const __m512 vscale = _mm512_set1_ps(scale);
  for (int64_t g = 0; g < G; ++g)
    for (int j = 0; j < NV; ++j)
      _mm512_storeu_ps(qf + g * D + 16 * j, _mm512_mul_ps(load16(q + (b * H + h * G + g) * D + 16 * j), vscale));
  // pass 1: scores (G, L), block by block along the table
  for (int64_t t0 = 0; t0 < L; t0 += bs) {
    const T* kr = k_cache + (table[t0 / bs] * bs * Hkv + h) * D;
    for (int64_t t = t0, end = std::min(L, t0 + bs); t < end; ++t, kr += row_stride) {
      __m512 k[NV];
      for (int j = 0; j < NV; ++j) k[j] = load16(kr + 16 * j);
      for (int64_t g = 0; g < G; ++g) {
        __m512 s = _mm512_mul_ps(_mm512_loadu_ps(qf + g * D), k[0]);
        for (int j = 1; j < NV; ++j) s = _mm512_fmadd_ps(_mm512_loadu_ps(qf + g * D + 16 * j), k[j], s);
        scores[g * ld + t] = _mm512_reduce_add_ps(s);
      }
    }
  }
  // softmax numerators in place; each head's 1 / sum is applied to its output at the end
  float inv_sum[64];
  const __mmask16 tail = static_cast<__mmask16>((1u << (L % 16)) - 1);
  for (int64_t g = 0; g < G; ++g) {
    float* sc = scores + g * ld;
    __m512 m = _mm512_set1_ps(-std::numeric_limits<float>::infinity());
    int64_t t = 0;
    for (; t + 16 <= L; t += 16) m = _mm512_max_ps(m, _mm512_loadu_ps(sc + t));
    if (tail) m = _mm512_mask_max_ps(m, tail, m, _mm512_maskz_loadu_ps(tail, sc + t));
    const __m512 mx = _mm512_set1_ps(_mm512_reduce_max_ps(m));
    __m512 sum = _mm512_setzero_ps();
    for (t = 0; t + 16 <= L; t += 16) {
      const __m512 e = exp512(_mm512_sub_ps(_mm512_loadu_ps(sc + t), mx));
      _mm512_storeu_ps(sc + t, e);
      sum = _mm512_add_ps(sum, e);
    }
    if (tail) {
      const __m512 e = exp512(_mm512_sub_ps(_mm512_maskz_loadu_ps(tail, sc + t), mx));
      _mm512_mask_storeu_ps(sc + t, tail, e);
      sum = _mm512_mask_add_ps(sum, tail, sum, e);
    }
    inv_sum[g] = 1.f / _mm512_reduce_add_ps(sum);
  }
  // pass 2: out = P @ V, one head at a time with its D accumulators in registers
  for (int64_t g = 0; g < G; ++g) {
    const float* p = scores + g * ld;
    __m512 acc[NV];
    for (int j = 0; j < NV; ++j) acc[j] = _mm512_setzero_ps();
    for (int64_t t0 = 0; t0 < L; t0 += bs) {
      const T* vr = v_cache + (table[t0 / bs] * bs * Hkv + h) * D;
      for (int64_t t = t0, end = std::min(L, t0 + bs); t < end; ++t, vr += row_stride) {
        const __m512 pt = _mm512_set1_ps(p[t]);
        for (int j = 0; j < NV; ++j) acc[j] = _mm512_fmadd_ps(pt, load16(vr + 16 * j), acc[j]);
      }
    }
    const __m512 inv = _mm512_set1_ps(inv_sum[g]);
    T* o = out + (b * H + h * G + g) * D;
    for (int j = 0; j < NV; ++j) store16(o + 16 * j, _mm512_mul_ps(acc[j], inv));
  }
}

template <typename T, int NV>
static void decode_vec(const T* qp, const T* kp, const T* vp, const int64_t* tp, const int64_t* lp, T* op,
                       int64_t B, int64_t H, int64_t Hkv, int64_t bs, int64_t max_blocks, int64_t max_len, float scale) {
  const int64_t G = H / Hkv, ld = (max_len + 15) / 16 * 16;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    std::vector<float> qf(G * 16 * NV), scores(G * ld);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv;
      decode_task_vec<T, NV>(qp, kp, vp, tp + b * max_blocks, lp[b], op, b, h, H, Hkv, bs, scale, qf.data(),
                             scores.data(), ld);
    }
  });
}

// Runs the vector path when head_dim has one; false sends the caller to the scalar path.
template <typename T>
static bool try_decode_vec(const T* qp, const T* kp, const T* vp, const int64_t* tp, const int64_t* lp, T* op,
                           int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t bs, int64_t max_blocks,
                           int64_t max_len, float scale) {
  if (H / Hkv > 64) return false;
  switch (D) {
    case 32: decode_vec<T, 2>(qp, kp, vp, tp, lp, op, B, H, Hkv, bs, max_blocks, max_len, scale); return true;
    case 64: decode_vec<T, 4>(qp, kp, vp, tp, lp, op, B, H, Hkv, bs, max_blocks, max_len, scale); return true;
    case 128: decode_vec<T, 8>(qp, kp, vp, tp, lp, op, B, H, Hkv, bs, max_blocks, max_len, scale); return true;
    case 256: decode_vec<T, 16>(qp, kp, vp, tp, lp, op, B, H, Hkv, bs, max_blocks, max_len, scale); return true;
    default: return false;
  }
}
#else
template <typename T>
static bool try_decode_vec(const T*, const T*, const T*, const int64_t*, const int64_t*, T*, int64_t, int64_t,
                           int64_t, int64_t, int64_t, int64_t, int64_t, float) {
  return false;
}
#endif

template <typename T>
static void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& seq_lens, at::Tensor& out, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2), max_blocks = block_tables.size(1);
  const T *qp = q.data_ptr<T>(), *kp = k_cache.data_ptr<T>(), *vp = v_cache.data_ptr<T>();
  const int64_t *tp = block_tables.data_ptr<int64_t>(), *lp = seq_lens.data_ptr<int64_t>();
  const int64_t max_len = *std::max_element(lp, lp + B);  // read in place: no tensor ops per layer
  T* op = out.data_ptr<T>();
  if (max_len > 0 && try_decode_vec<T>(qp, kp, vp, tp, lp, op, B, H, Hkv, D, bs, max_blocks, max_len,
                                       static_cast<float>(scale)))
    return;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t begin, int64_t end) {
    const int64_t G = H / Hkv;
    std::vector<float> qf(G * D), scores(G * max_len), acc(G * D), row(D);
    for (int64_t i = begin; i < end; ++i) {
      const int64_t b = i / Hkv, h = i % Hkv;
      decode_task<T>(qp, kp, vp, tp + b * max_blocks, lp[b], op, b, h, H, Hkv, D, bs, static_cast<float>(scale),
                     qf, scores, acc, row);
    }
  });
}

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                     at::Tensor block_tables, at::Tensor seq_lens, double scale) {
  auto out = at::empty_like(q);
  if (q.scalar_type() == at::kBFloat16) {
    decode<c10::BFloat16>(q, k_cache, v_cache, block_tables, seq_lens, out, scale);
  } else if (q.scalar_type() == at::kFloat) {
    decode<float>(q, k_cache, v_cache, block_tables, seq_lens, out, scale);
  } else {
    TORCH_CHECK(false, "paged_decode_attention supports float32 and bfloat16, got ", q.scalar_type());
  }
  return out;
}
