// The attention layer's input side in one pass, on the CPU: split the fused q/k/v
// projection, apply the rotary embedding (rotate-half form) to q and k, and store k and v
// in the paged KV cache. Eagerly this is about 25 small ops per layer (split, views, eight
// multiplies, cat, two index_puts, ...), which at one decoded token cost more than the
// arithmetic itself.
//
//   qkv      : (N, (H + 2 Hkv) D)  rows [q heads | k heads | v heads]
//   cos, sin : (N, D/2)            this step's positions, in qkv's dtype
//   kv_cache : (2, num_blocks, block_size, Hkv, D)   [0] keys, [1] values
//   slots    : (N,) int64          token n goes to block slots[n] / block_size, offset slots[n] % block_size
//   -> q     : (N, H, D) rotated
//
// Each product and difference is rounded to the dtype as the eager ops round them, and no
// multiply-add is fused, so the result is bit-identical to the torch twin.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>

#pragma GCC optimize("fp-contract=off")

namespace {

template <typename T>
inline float r(float v) {  // round to T, as an eager op producing a T tensor does
  return static_cast<float>(static_cast<T>(v));
}

// out = [x1 cos - x2 sin | x2 cos + x1 sin] for one head of D values.
template <typename T>
inline void rotate_half(const T* x, const T* cos, const T* sin, T* out, int64_t half) {
  for (int64_t i = 0; i < half; ++i) {
    const float x1 = x[i], x2 = x[i + half], c = cos[i], s = sin[i];
    out[i] = static_cast<T>(r<T>(x1 * c) - r<T>(x2 * s));
    out[i + half] = static_cast<T>(r<T>(x2 * c) + r<T>(x1 * s));
  }
}

template <typename T>
void rotary_kv_write_rows(const T* qkv, const T* cos, const T* sin, T* k_cache, T* v_cache, const int64_t* slots,
                          T* q, int64_t H, int64_t Hkv, int64_t D, int64_t n0, int64_t n1) {
  const int64_t half = D / 2, width = (H + 2 * Hkv) * D;
  for (int64_t n = n0; n < n1; ++n) {
    const T* row = qkv + n * width;
    const T *c = cos + n * half, *s = sin + n * half;
    for (int64_t h = 0; h < H; ++h) rotate_half(row + h * D, c, s, q + (n * H + h) * D, half);
    T* k_dst = k_cache + slots[n] * Hkv * D;
    T* v_dst = v_cache + slots[n] * Hkv * D;
    for (int64_t h = 0; h < Hkv; ++h) rotate_half(row + (H + h) * D, c, s, k_dst + h * D, half);
    std::copy(row + (H + Hkv) * D, row + width, v_dst);
  }
}

}  // namespace

at::Tensor rotary_kv_write(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& kv_cache,
                           const at::Tensor& slots, int64_t num_heads) {
  TORCH_CHECK(kv_cache.dim() == 5 && kv_cache.size(0) == 2 && kv_cache.is_contiguous(),
              "rotary_kv_write: kv_cache must be a contiguous (2, num_blocks, block_size, Hkv, D)");
  const int64_t N = qkv.size(0), Hkv = kv_cache.size(3), D = kv_cache.size(4), H = num_heads;
  TORCH_CHECK(qkv.dim() == 2 && qkv.is_contiguous() && qkv.size(1) == (H + 2 * Hkv) * D && D % 2 == 0,
              "rotary_kv_write: qkv must be a contiguous (N, (H + 2 Hkv) D); got ", qkv.sizes());
  TORCH_CHECK(cos.is_contiguous() && sin.is_contiguous() && cos.numel() == N * D / 2 && sin.numel() == N * D / 2,
              "rotary_kv_write: cos and sin must be contiguous with N * D/2 values");
  TORCH_CHECK(qkv.scalar_type() == kv_cache.scalar_type() && cos.scalar_type() == qkv.scalar_type() &&
                  sin.scalar_type() == qkv.scalar_type(),
              "rotary_kv_write: qkv, cos, sin and kv_cache must share a dtype");
  TORCH_CHECK(slots.scalar_type() == at::kLong && slots.is_contiguous() && slots.numel() == N,
              "rotary_kv_write: slots must be a contiguous int64 (N,)");
  const int64_t num_slots = kv_cache.size(1) * kv_cache.size(2);
  const int64_t* sp = slots.data_ptr<int64_t>();
  for (int64_t n = 0; n < N; ++n)
    TORCH_CHECK(sp[n] >= 0 && sp[n] < num_slots, "rotary_kv_write: slot ", sp[n], " outside the cache's ", num_slots);
  at::Tensor q = at::empty({N, H, D}, qkv.options());
  const int64_t cache_numel = kv_cache.numel() / 2;
  AT_DISPATCH_FLOATING_TYPES_AND(at::kBFloat16, qkv.scalar_type(), "rotary_kv_write", [&] {
    scalar_t* k_cache = kv_cache.data_ptr<scalar_t>();
    // A few tokens (decode) are not worth waking a second thread for.
    at::parallel_for(0, N, 16, [&](int64_t n0, int64_t n1) {
      rotary_kv_write_rows<scalar_t>(qkv.data_ptr<scalar_t>(), cos.data_ptr<scalar_t>(), sin.data_ptr<scalar_t>(),
                                     k_cache, k_cache + cache_numel, sp,
                                     q.data_ptr<scalar_t>(), H, Hkv, D, n0, n1);
    });
  });
  return q;
}
