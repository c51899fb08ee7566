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
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <limits>
#include <vector>

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

template <typename T>
static void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& seq_lens, at::Tensor& out, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2);
  const int64_t bs = k_cache.size(1), Hkv = k_cache.size(2), max_blocks = block_tables.size(1);
  const T *qp = q.data_ptr<T>(), *kp = k_cache.data_ptr<T>(), *vp = v_cache.data_ptr<T>();
  const int64_t *tp = block_tables.data_ptr<int64_t>(), *lp = seq_lens.data_ptr<int64_t>();
  const int64_t max_len = *std::max_element(lp, lp + B);  // read in place: no tensor ops per layer
  T* op = out.data_ptr<T>();
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
