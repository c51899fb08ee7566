// vec.h for AVX2 + FMA + F16C (every x86-64 CPU since Haswell and Zen 1): 8 floats per
// register. Integer dot products use AVX-VNNI where present, else VPMADDUBSW pairs summed
// by VPMADDWD.
#pragma once

#include <immintrin.h>

namespace r1serve_vec {

constexpr int kLanes = 8;
constexpr int kVecRegs = 16;  // architectural vector registers
constexpr const char* kIsa = "avx2";

using vf = __m256;
using vmask = __m256;
using vi = __m256i;
using vbytes = __m256i;

inline vf vzero() { return _mm256_setzero_ps(); }
inline vf vset1(float x) { return _mm256_set1_ps(x); }
inline vf vload(const float* p) { return _mm256_loadu_ps(p); }
inline vf vload(const bf16* p) {
  const __m128i h = _mm_loadu_si128(reinterpret_cast<const __m128i*>(p));
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(h), 16));
}
inline vf vload_half(const uint16_t* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
inline void vstore(float* p, vf v) { _mm256_storeu_ps(p, v); }

// Round to nearest even in integers, NaN to 0x7FC0 (as vec_types.h's to_bf16): 8 x 16 bits.
inline __m128i to_bf16_bits(vf v) {
  const __m256i u = _mm256_castps_si256(v);
  const __m256i bias = _mm256_add_epi32(_mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1)),
                                        _mm256_set1_epi32(0x7FFF));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(u, bias), 16);
  const __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(v, v, _CMP_UNORD_Q));
  r = _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7FC0), nan);
  // packus works within 128-bit halves: [r0..3 r0..3 | r4..7 r4..7] -> quadwords 0 and 2
  const __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(r, r), 0xD8);
  return _mm256_castsi256_si128(packed);
}
inline void vstore(bf16* p, vf v) { _mm_storeu_si128(reinterpret_cast<__m128i*>(p), to_bf16_bits(v)); }
inline vf vround(vf v, const float*) { return v; }
inline vf vround(vf v, const bf16*) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_cvtepu16_epi32(to_bf16_bits(v)), 16));
}

inline vf vadd(vf a, vf b) { return _mm256_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm256_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm256_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm256_div_ps(a, b); }
inline vf vfmadd(vf a, vf b, vf c) { return _mm256_fmadd_ps(a, b, c); }
inline vf vmax(vf a, vf b) { return _mm256_max_ps(a, b); }
inline vf vabs(vf v) { return _mm256_andnot_ps(_mm256_set1_ps(-0.f), v); }
inline vf vrint(vf v) { return _mm256_round_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline void vstore_i8(int8_t* p, vf v) {
  const __m256i i32 = _mm256_cvtps_epi32(v);
  const __m128i i16 = _mm_packs_epi32(_mm256_castsi256_si128(i32), _mm256_extracti128_si256(i32, 1));
  _mm_storel_epi64(reinterpret_cast<__m128i*>(p), _mm_packs_epi16(i16, i16));
}
inline float vhsum(vf v) {
  __m128 s = _mm_add_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_add_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_add_ss(s, _mm_movehdup_ps(s)));
}
inline float vhmax(vf v) {
  __m128 s = _mm_max_ps(_mm256_castps256_ps128(v), _mm256_extractf128_ps(v, 1));
  s = _mm_max_ps(s, _mm_movehl_ps(s, s));
  return _mm_cvtss_f32(_mm_max_ss(s, _mm_movehdup_ps(s)));
}

inline vf vmin(vf a, vf b) { return _mm256_min_ps(a, b); }
// 2^n for integral n in -126..127, built in the exponent field
inline vf vpow2i(vf n) {
  return _mm256_castsi256_ps(_mm256_slli_epi32(_mm256_add_epi32(_mm256_cvtps_epi32(n), _mm256_set1_epi32(127)), 23));
}

inline vmask vgt(vf a, vf b) { return _mm256_cmp_ps(a, b, _CMP_GT_OQ); }
inline vmask visnan(vf v) { return _mm256_cmp_ps(v, v, _CMP_UNORD_Q); }
inline bool vany(vmask m) { return _mm256_movemask_ps(m) != 0; }
inline vf vselect(vmask m, vf t, vf f) { return _mm256_blendv_ps(f, t, m); }

inline vi vizero() { return _mm256_setzero_si256(); }
inline vi vadd_i32(vi a, vi b) { return _mm256_add_epi32(a, b); }
inline vf vcvt(vi v) { return _mm256_cvtepi32_ps(v); }
inline vf vload_i8(const int8_t* p) {
  return _mm256_cvtepi32_ps(_mm256_cvtepi8_epi32(_mm_loadl_epi64(reinterpret_cast<const __m128i*>(p))));
}
inline vbytes vload_bytes(const uint8_t* p) { return _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)); }
inline vbytes vlow_nibbles(vbytes v) { return _mm256_and_si256(v, _mm256_set1_epi8(0x0F)); }
inline vbytes vhigh_nibbles(vbytes v) { return _mm256_and_si256(_mm256_srli_epi16(v, 4), _mm256_set1_epi8(0x0F)); }

constexpr int kByteDotOffset = 128;
// An accumulator pinned to a register at this point. Without it GCC turns a group's chain
// of integer adds into a tree over all of the group's products, whose operands outnumber
// the 16 registers and spill: the int4 GEMM ran 20-25% slower.
inline __m256i vkeep(__m256i acc) {
  __asm__("" : "+x"(acc));
  return acc;
}
#if defined(__AVXVNNI__)
using vnib = __m256i;  // int32 lanes: VPDPBUSD sums its fours itself
inline vnib vnib_zero() { return _mm256_setzero_si256(); }
inline vnib vnib_dot(vnib acc, vbytes u, int32_t a4) { return _mm256_dpbusd_avx_epi32(acc, u, _mm256_set1_epi32(a4)); }
inline vi vnib_finish(vnib acc) { return acc; }
#else
// A group's pairs summed in int16 (8 x 3810 < 2^15) and widened once: a third fewer
// instructions than widening each product pair.
using vnib = __m256i;
inline vnib vnib_zero() { return _mm256_setzero_si256(); }
inline vnib vnib_dot(vnib acc, vbytes u, int32_t a4) {
  return vkeep(_mm256_add_epi16(acc, _mm256_maddubs_epi16(u, _mm256_set1_epi32(a4))));
}
inline vi vnib_finish(vnib acc) { return _mm256_madd_epi16(acc, _mm256_set1_epi16(1)); }
#endif
// u - 128 as a signed byte s (|s| <= 127 for the codes 1..255), multiplied as |s| times a
// with s's sign so that VPMADDUBSW's pairs stay below 2^15.
struct vcodes8 {
  __m256i s, abs;
};
inline vcodes8 vprep_bytes(vbytes u) {
  const __m256i s = _mm256_xor_si256(u, _mm256_set1_epi8(static_cast<char>(0x80)));
  return {s, _mm256_sign_epi8(s, s)};
}
inline vi vdot_bytes(vi acc, vcodes8 c, int32_t a4) {
  const __m256i pairs = _mm256_maddubs_epi16(c.abs, _mm256_sign_epi8(_mm256_set1_epi32(a4), c.s));
  return vkeep(_mm256_add_epi32(acc, _mm256_madd_epi16(pairs, _mm256_set1_epi16(1))));
}

}  // namespace r1serve_vec
