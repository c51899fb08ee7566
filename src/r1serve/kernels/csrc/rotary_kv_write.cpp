// ATen glue of the fused rotary + KV-cache write (the kernel is rotary_kv_write.h). Eagerly
// this is about 25 small ops per layer (split, views, eight multiplies, cat, two
// index_puts, ...), which at one decoded token cost more than the arithmetic itself.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "aten_types.h"
#include "rotary_kv_write.h"

template <typename T, typename C>
static void rows(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& kv_cache,
                 const int64_t* slots, at::Tensor& q, int64_t H, int64_t Hkv, int64_t D) {
  auto* k_cache = as_vec_mut<C>(kv_cache);
  auto* v_cache = k_cache + kv_cache.numel() / 2;
  const auto *qkv_p = as_vec<T>(qkv), *cos_p = as_vec<T>(cos), *sin_p = as_vec<T>(sin);
  auto* q_p = as_vec_mut<T>(q);
  // A few tokens (decode) are not worth waking a second thread for.
  at::parallel_for(0, qkv.size(0), 16, [&](int64_t n0, int64_t n1) {
    r1serve_kernels::rotary_kv_write_rows(qkv_p, cos_p, sin_p, k_cache, v_cache, slots, q_p, H, Hkv, D, n0, n1);
  });
}

template <typename T>
static void rows_cache_dtype(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin,
                             at::Tensor& kv_cache, const int64_t* slots, at::Tensor& q, int64_t H, int64_t Hkv,
                             int64_t D) {
  if (kv_cache.scalar_type() == at::kBFloat16)
    rows<T, at::BFloat16>(qkv, cos, sin, kv_cache, slots, q, H, Hkv, D);
  else
    rows<T, float>(qkv, cos, sin, kv_cache, slots, q, H, Hkv, D);
}

at::Tensor rotary_kv_write(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& kv_cache,
                           const at::Tensor& slots, int64_t num_heads) {
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "rotary_kv_write: kv_cache must be a contiguous (2, num_blocks, block_size, Hkv, D)");
  const int64_t N = qkv.size(0), Hkv = kv_cache.size(3), D = kv_cache.size(4), H = num_heads;
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == (H + 2 * Hkv) * D && D % 2 == 0,
              "rotary_kv_write: qkv must be a contiguous (N, (H + 2 Hkv) D); got ", qkv.sizes());
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == N * D / 2 && sin.numel() == N * D / 2,
              "rotary_kv_write: cos and sin must be contiguous with N * D/2 values");
  TORCH_CHECK(cos.scalar_type() == qkv.scalar_type() && sin.scalar_type() == qkv.scalar_type(),
              "rotary_kv_write: qkv, cos and sin must share a dtype");
  TORCH_CHECK(kv_cache.scalar_type() == at::kFloat || kv_cache.scalar_type() == at::kBFloat16,
              "rotary_kv_write: the cache must be float32 or bfloat16, got ", kv_cache.scalar_type());
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == N,
              "rotary_kv_write: slots must be a contiguous int64 (N,)");
  const int64_t num_slots = kv_cache.size(1) * kv_cache.size(2);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(sp[n] >= 0 && sp[n] < num_slots, "rotary_kv_write: slot ", sp[n], " outside the cache's ", num_slots);
  at::Tensor q = at::empty({N, H, D}, qkv.options());
  if (qkv.scalar_type() == at::kBFloat16)
    rows_cache_dtype<at::BFloat16>(qkv, cos, sin, kv_cache, sp, q, H, Hkv, D);
  else if (qkv.scalar_type() == at::kFloat)
    rows_cache_dtype<float>(qkv, cos, sin, kv_cache, sp, q, H, Hkv, D);
  else
    TORCH_CHECK(false, "rotary_kv_write supports float32 and bfloat16, got ", qkv.scalar_type());
  return q;
}
