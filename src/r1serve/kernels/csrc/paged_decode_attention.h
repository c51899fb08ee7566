// Decode attention read straight from the paged KV cache: the kernel's core, without ATen.
//
// One task per (sequence, KV head). The G query heads that share the KV head are handled
// together, so every key and value row is loaded once per group, in place: no gather of
// the context into a padded batch, no dtype conversion pass over it.
//
//   k_cache, v_cache : (num_blocks, block_size, num_kv_heads, head_dim)   C: float or bf16
//   q, out           : (B, num_heads, head_dim)                          T: float or bf16
//
// The cache may be narrower than the activations (bf16 under float32: half the bytes a
// step streams, the cost of attention at long contexts); rows are widened as they load.
//   block_tables     : (B, max_blocks) int64     seq_lens : (B,) int64
//
// Two passes per task: scores = q.K for all L positions (kept in a float buffer), then
// softmax and the weighted sum of V. Accumulation is in float32.
//
// Head sizes 32/64/128/256 (every model r1serve serves) take the vector path: each key row
// is loaded once and dotted with the G query heads, the exp is vectorised, and each value
// row is loaded once for up to 4 heads, whose outputs accumulate in registers. It was 6-8x
// faster than the scalar path at 32 sequences, where attention had been a third of a
// decode step. The scalar path (other head sizes, more than 64 heads per KV head) computes
// the same thing.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <vector>

#include "vec.h"

namespace r1serve_kernels {
using namespace r1serve_vec;

template <typename T, typename C = T>
struct DecodeAttention {
  const T* q;
  const C *k_cache, *v_cache;
  const int64_t *block_tables, *seq_lens;
  T* out;
  int64_t B, H, Hkv, D, block_size, max_blocks;
  float scale;

  int64_t max_len() const { return B ? *std::max_element(seq_lens, seq_lens + B) : 0; }
  const C* row(const C* cache, const int64_t* table, int64_t t, int64_t h) const {
    return cache + ((table[t / block_size] * block_size + t % block_size) * Hkv + h) * D;
  }
};

// Dot product written as 16 independent lanes, so the compiler vectorises it without
// being allowed to reorder float additions (no -ffast-math).
inline float dot_scalar(const float* a, const float* b, int64_t n) {
  float lanes[16] = {0.f};
  int64_t d = 0;
  for (; d + 16 <= n; d += 16)
    for (int j = 0; j < 16; ++j) lanes[j] += a[d + j] * b[d + j];
  float s = 0.f;
  for (int j = 0; j < 16; ++j) s += lanes[j];
  for (; d < n; ++d) s += a[d] * b[d];
  return s;
}

template <typename T, typename C>
void decode_task_scalar(const DecodeAttention<T, C>& a, int64_t b, int64_t h) {
  const int64_t G = a.H / a.Hkv, D = a.D, L = a.seq_lens[b];
  const int64_t* table = a.block_tables + b * a.max_blocks;
  std::vector<float> qf(G * D), scores(G * std::max<int64_t>(L, 1)), acc(G * D, 0.f), row(D);
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) qf[g * D + d] = to_float(a.q[(b * a.H + h * G + g) * D + d]) * a.scale;
  for (int64_t t = 0; t < L; ++t) {  // pass 1: scores (G, L)
    const C* kr = a.row(a.k_cache, table, t, h);
    for (int64_t d = 0; d < D; ++d) row[d] = to_float(kr[d]);  // once for all G heads
    for (int64_t g = 0; g < G; ++g) scores[g * L + t] = dot_scalar(qf.data() + g * D, row.data(), D);
  }
  for (int64_t g = 0; g < G; ++g) {  // softmax over each head's row
    float m = -std::numeric_limits<float>::infinity(), sum = 0.f;
    for (int64_t t = 0; t < L; ++t) m = std::max(m, scores[g * L + t]);
    for (int64_t t = 0; t < L; ++t) sum += (scores[g * L + t] = std::exp(scores[g * L + t] - m));
    for (int64_t t = 0; t < L; ++t) scores[g * L + t] /= sum;
  }
  for (int64_t t = 0; t < L; ++t) {  // pass 2: out = P @ V
    const C* vr = a.row(a.v_cache, table, t, h);
    for (int64_t d = 0; d < D; ++d) row[d] = to_float(vr[d]);
    for (int64_t g = 0; g < G; ++g)
      for (int64_t d = 0; d < D; ++d) acc[g * D + d] += scores[g * L + t] * row[d];
  }
  for (int64_t g = 0; g < G; ++g)
    for (int64_t d = 0; d < D; ++d) a.out[(b * a.H + h * G + g) * D + d] = from_float<T>(acc[g * D + d]);
}

// The scores of one head, exponentiated in place (numerators of the softmax); returns
// 1 / their sum. sc holds L scores, then -inf up to a whole register.
inline float softmax_numerators(float* sc, int64_t L) {
  const int64_t Lr = (L + kLanes - 1) / kLanes * kLanes;
  std::fill(sc + L, sc + Lr, -std::numeric_limits<float>::infinity());
  vf m = vset1(-std::numeric_limits<float>::infinity());
  for (int64_t t = 0; t < Lr; t += kLanes) m = vmax(m, vload(sc + t));
  const vf mx = vset1(vhmax(m));
  vf sum = vzero();
  for (int64_t t = 0; t < Lr; t += kLanes) {  // the padding's exp is ~1e-38: it adds nothing
    const vf e = vexp(vsub(vload(sc + t), mx));
    vstore(sc + t, e);
    sum = vadd(sum, e);
  }
  return 1.f / vhsum(sum);
}

// Heads of a KV group that share one pass over V: each V row is loaded (and widened) once
// for all of them while their outputs accumulate in registers.
constexpr int kHeadsPerPass = 4;

// Registers of a V row per pass for GS heads: the largest of 8, 4, 2, 1 dividing the row's
// NV that leaves GS of them per head, the row's (one head folds its loads into the FMAs)
// and a broadcast within the ISA's registers.
template <int NV, int GS>
constexpr int v_chunk() {
  for (int c : {8, 4, 2})
    if (NV % c == 0 && GS * c + (GS > 1 ? c : 0) + 2 <= kVecRegs) return c;
  return 1;
}

// out[s] = (P[s] @ V) * inv[s] for GS heads of one task; p: their numerators, ld apart.
template <typename T, typename C, int D, int GS>
void weighted_values(const DecodeAttention<T, C>& a, const int64_t* table, int64_t h, int64_t L, const float* p,
                     int64_t ld, const float* inv, T* out) {
  constexpr int NV = D / kLanes, kChunk = v_chunk<NV, GS>();
  const int64_t bs = a.block_size, row_stride = a.Hkv * D;
  for (int c0 = 0; c0 < NV; c0 += kChunk) {
    vf acc[GS][kChunk];
    for (int s = 0; s < GS; ++s)
      for (int j = 0; j < kChunk; ++j) acc[s][j] = vzero();
    for (int64_t t0 = 0; t0 < L; t0 += bs) {
      const C* vr = a.v_cache + (table[t0 / bs] * bs * a.Hkv + h) * D + kLanes * c0;
      for (int64_t t = t0, end = std::min(L, t0 + bs); t < end; ++t, vr += row_stride) {
        vf v[kChunk];
        for (int j = 0; j < kChunk; ++j) v[j] = vload(vr + kLanes * j);
        for (int s = 0; s < GS; ++s) {
          const vf pt = vset1(p[s * ld + t]);
          for (int j = 0; j < kChunk; ++j) acc[s][j] = vfmadd(pt, v[j], acc[s][j]);
        }
      }
    }
    for (int s = 0; s < GS; ++s)
      for (int j = 0; j < kChunk; ++j) vstore(out + s * D + kLanes * (c0 + j), vmul(acc[s][j], vset1(inv[s])));
  }
}

// One (sequence, KV head) task for head size D (a whole number of registers).
// qf: G * D floats; scores: G rows of ld floats, ld >= L rounded up to a register.
template <typename T, typename C, int D>
void decode_task_vec(const DecodeAttention<T, C>& a, int64_t b, int64_t h, float* qf, float* scores, int64_t ld) {
  constexpr int NV = D / kLanes;
  const int64_t G = a.H / a.Hkv, L = a.seq_lens[b], bs = a.block_size, row_stride = a.Hkv * D;
  const int64_t* table = a.block_tables + b * a.max_blocks;
  T* out = a.out + (b * a.H + h * G) * D;
  if (L <= 0) {  // an empty context attends to nothing: zeros, as the scalar path gives
    std::fill_n(out, G * D, from_float<T>(0.f));
    return;
  }
  const vf vscale = vset1(a.scale);
  for (int64_t g = 0; g < G; ++g)
    for (int j = 0; j < NV; ++j)
      vstore(qf + g * D + kLanes * j, vmul(vload(a.q + (b * a.H + h * G + g) * D + kLanes * j), vscale));
  // Pass 1: scores (G, L), block by block along the table. At tens of sequences the cache
  // comes from memory, and each block is a jump the hardware prefetcher cannot follow: each
  // row prefetches the next block's key row and this block's value row (for pass 2). With
  // the next task's first keys prefetched too (decode_tasks_vec), a layer at 32 sequences of
  // 110 tokens (bf16 cache, AVX2, 2 threads, 30 layers' caches) went from 350 to 278 us.
  for (int64_t t0 = 0; t0 < L; t0 += bs) {
    const C* kr = a.k_cache + (table[t0 / bs] * bs * a.Hkv + h) * D;
    const C* vr = a.v_cache + (table[t0 / bs] * bs * a.Hkv + h) * D;
    const C* next_kr = t0 + bs < L ? a.k_cache + (table[t0 / bs + 1] * bs * a.Hkv + h) * D : nullptr;
    for (int64_t t = t0, end = std::min(L, t0 + bs); t < end; ++t, kr += row_stride, vr += row_stride) {
      for (int64_t line = 0; line < D * static_cast<int64_t>(sizeof(C)); line += 64) {
        const char* v_line = reinterpret_cast<const char*>(vr) + line;
        __builtin_prefetch(v_line, 0, 3);
        if (next_kr != nullptr) __builtin_prefetch(reinterpret_cast<const char*>(next_kr + (t - t0) * row_stride) + line, 0, 3);
      }
      vf k[NV];
      for (int j = 0; j < NV; ++j) k[j] = vload(kr + kLanes * j);
      for (int64_t g = 0; g < G; ++g) {
        vf s = vmul(vload(qf + g * D), k[0]);
        for (int j = 1; j < NV; ++j) s = vfmadd(vload(qf + g * D + kLanes * j), k[j], s);
        scores[g * ld + t] = vhsum(s);
      }
    }
  }
  float inv[64];  // G <= 64 on the vector path
  for (int64_t g = 0; g < G; ++g) inv[g] = softmax_numerators(scores + g * ld, L);
  for (int64_t g0 = 0; g0 < G; g0 += kHeadsPerPass) {  // pass 2: out = P @ V
    const float* p = scores + g0 * ld;
    switch (std::min<int64_t>(kHeadsPerPass, G - g0)) {
      case 1: weighted_values<T, C, D, 1>(a, table, h, L, p, ld, inv + g0, out + g0 * D); break;
      case 2: weighted_values<T, C, D, 2>(a, table, h, L, p, ld, inv + g0, out + g0 * D); break;
      case 3: weighted_values<T, C, D, 3>(a, table, h, L, p, ld, inv + g0, out + g0 * D); break;
      default: weighted_values<T, C, D, 4>(a, table, h, L, p, ld, inv + g0, out + g0 * D); break;
    }
  }
}

// The key rows of a task's first block, fetched while the task before it runs.
template <typename T, typename C, int D>
void prefetch_first_keys(const DecodeAttention<T, C>& a, int64_t b, int64_t h) {
  const int64_t n = std::min(a.seq_lens[b], a.block_size);
  const char* kr = reinterpret_cast<const char*>(a.k_cache + (a.block_tables[b * a.max_blocks] * a.block_size * a.Hkv + h) * D);
  for (int64_t t = 0; t < n; ++t, kr += a.Hkv * D * static_cast<int64_t>(sizeof(C)))
    for (int64_t line = 0; line < D * static_cast<int64_t>(sizeof(C)); line += 64) __builtin_prefetch(kr + line, 0, 3);
}

template <typename T, typename C, int D>
void decode_tasks_vec(const DecodeAttention<T, C>& a, int64_t i0, int64_t i1) {
  const int64_t G = a.H / a.Hkv, ld = (a.max_len() + kLanes - 1) / kLanes * kLanes;
  std::vector<float> qf(G * D), scores(G * std::max<int64_t>(ld, kLanes));
  for (int64_t i = i0; i < i1; ++i) {
    if (i + 1 < i1) prefetch_first_keys<T, C, D>(a, (i + 1) / a.Hkv, (i + 1) % a.Hkv);
    decode_task_vec<T, C, D>(a, i / a.Hkv, i % a.Hkv, qf.data(), scores.data(), ld);
  }
}

// Tasks i0..i1 of B * Hkv (task i: sequence i / Hkv, KV head i % Hkv); `vector` false
// forces the scalar path (for tests).
template <typename T, typename C>
void decode_tasks(const DecodeAttention<T, C>& a, int64_t i0, int64_t i1, bool vector = true) {
  if (vector && a.H / a.Hkv <= 64) {
    switch (a.D) {
      case 32: return decode_tasks_vec<T, C, 32>(a, i0, i1);
      case 64: return decode_tasks_vec<T, C, 64>(a, i0, i1);
      case 128: return decode_tasks_vec<T, C, 128>(a, i0, i1);
      case 256: return decode_tasks_vec<T, C, 256>(a, i0, i1);
      default: break;
    }
  }
  for (int64_t i = i0; i < i1; ++i) decode_task_scalar(a, i / a.Hkv, i % a.Hkv);
}

}  // namespace r1serve_kernels
