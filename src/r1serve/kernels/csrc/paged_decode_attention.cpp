// ATen glue of the paged decode attention (the kernel is paged_decode_attention.h).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#include "aten_types.h"
#include "paged_decode_attention.h"

template <typename T, typename C>
static void decode(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                   const at::Tensor& block_tables, const at::Tensor& seq_lens, at::Tensor& out, double scale) {
  const r1serve_kernels::DecodeAttention<r1serve_vec_t<T>, r1serve_vec_t<C>> a{
      as_vec<T>(q), as_vec<C>(k_cache), as_vec<C>(v_cache), block_tables.data_ptr<int64_t>(),
      seq_lens.data_ptr<int64_t>(), as_vec_mut<T>(out), q.size(0), q.size(1), k_cache.size(2), q.size(2),
      k_cache.size(1), block_tables.size(1), static_cast<float>(scale)};
  at::parallel_for(0, a.B * a.Hkv, 1, [&](int64_t i0, int64_t i1) { r1serve_kernels::decode_tasks(a, i0, i1); });
}

template <typename T>
static void decode_cache_dtype(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_tables, const at::Tensor& seq_lens, at::Tensor& out,
                               double scale) {
  if (k_cache.scalar_type() == at::kBFloat16)
    decode<T, at::BFloat16>(q, k_cache, v_cache, block_tables, seq_lens, out, scale);
  else
    decode<T, float>(q, k_cache, v_cache, block_tables, seq_lens, out, scale);
}

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache,
                                  at::Tensor block_tables, at::Tensor seq_lens, double scale) {
  TORCH_CHECK(q.dim() == 3 && k_cache.dim() == 4 && k_cache.sizes() == v_cache.sizes() &&
                  q.size(2) == k_cache.size(3) && q.size(1) % k_cache.size(2) == 0,
              "paged_decode_attention: q (B, H, D) and caches (num_blocks, block_size, Hkv, D) disagree: ",
              q.sizes(), " ", k_cache.sizes());
  TORCH_CHECK(q.is_contiguous() && k_cache.is_contiguous() && v_cache.is_contiguous() &&
                  block_tables.is_contiguous() && seq_lens.is_contiguous(),
              "paged_decode_attention: every input must be contiguous");
  TORCH_CHECK(block_tables.scalar_type() == at::kLong && seq_lens.scalar_type() == at::kLong &&
                  block_tables.size(0) == q.size(0) && seq_lens.numel() == q.size(0),
              "paged_decode_attention: block_tables (B, max_blocks) and seq_lens (B,) must be int64");
  const auto kv = k_cache.scalar_type();
  TORCH_CHECK(v_cache.scalar_type() == kv && (kv == at::kFloat || kv == at::kBFloat16),
              "paged_decode_attention: the caches must share a dtype, float32 or bfloat16; got ", kv, " and ",
              v_cache.scalar_type());
  auto out = at::empty_like(q);
  if (q.scalar_type() == at::kBFloat16) {
    decode_cache_dtype<at::BFloat16>(q, k_cache, v_cache, block_tables, seq_lens, out, scale);
  } else if (q.scalar_type() == at::kFloat) {
    decode_cache_dtype<float>(q, k_cache, v_cache, block_tables, seq_lens, out, scale);
  } else {
    TORCH_CHECK(false, "paged_decode_attention supports float32 and bfloat16, got ", q.scalar_type());
  }
  return out;
}
