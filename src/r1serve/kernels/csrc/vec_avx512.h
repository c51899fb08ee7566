// vec.h for AVX512 (F, BW, DQ, VL): 16 floats per register. BF16 stores use the
// AVX512-BF16 conversion where present; integer dot products use VNNI where present.
#pragma once

#include <immintrin.h>

namespace r1serve_vec {

constexpr int kLanes = 16;
constexpr int kVecRegs = 32;  // architectural vector registers
constexpr const char* kIsa = "avx512";

using vf = __m512;
using vmask = __mmask16;
using vi = __m512i;
using vbytes = __m512i;

inline vf vzero() { return _mm512_setzero_ps(); }
inline vf vset1(float x) { return _mm512_set1_ps(x); }
inline vf vload(const float* p) { return _mm512_loadu_ps(p); }
inline vf vload(const bf16* p) {  // bf16 -> float is a 16-bit shift
  const __m256i h = _mm256_loadu_si256(reinterpret_cast<const __m256i*>(p));
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(h), 16));
}
inline vf vload_half(const uint16_t* p) {
  return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
}
inline void vstore(float* p, vf v) { _mm512_storeu_ps(p, v); }

inline __m256i to_bf16_bits(vf v) {
#if defined(__AVX512BF16__)
  return reinterpret_cast<__m256i>(_mm512_cvtneps_pbh(v));
#else  // round to nearest even in integers, NaN to 0x7FC0 (as vec_types.h's to_bf16)
  const __m512i u = _mm512_castps_si512(v);
  const __m512i bias = _mm512_add_epi32(_mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1)),
                                        _mm512_set1_epi32(0x7FFF));
  __m512i r = _mm512_srli_epi32(_mm512_add_epi32(u, bias), 16);
  r = _mm512_mask_mov_epi32(r, _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q), _mm512_set1_epi32(0x7FC0));
  return _mm512_cvtepi32_epi16(r);
#endif
}
inline void vstore(bf16* p, vf v) { _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), to_bf16_bits(v)); }
inline vf vround(vf v, const float*) { return v; }
inline vf vround(vf v, const bf16*) {
  return _mm512_castsi512_ps(_mm512_slli_epi32(_mm512_cvtepu16_epi32(to_bf16_bits(v)), 16));
}

inline vf vadd(vf a, vf b) { return _mm512_add_ps(a, b); }
inline vf vsub(vf a, vf b) { return _mm512_sub_ps(a, b); }
inline vf vmul(vf a, vf b) { return _mm512_mul_ps(a, b); }
inline vf vdiv(vf a, vf b) { return _mm512_div_ps(a, b); }
inline vf vfmadd(vf a, vf b, vf c) { return _mm512_fmadd_ps(a, b, c); }
inline vf vmax(vf a, vf b) { return _mm512_max_ps(a, b); }
inline vf vabs(vf v) { return _mm512_abs_ps(v); }
inline vf vrint(vf v) { return _mm512_roundscale_ps(v, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC); }
inline void vstore_i8(int8_t* p, vf v) {
  _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm512_cvtepi32_epi8(_mm512_cvtps_epi32(v)));
}
inline float vhsum(vf v) { return _mm512_reduce_add_ps(v); }
inline float vhmax(vf v) { return _mm512_reduce_max_ps(v); }

inline vf vmin(vf a, vf b) { return _mm512_min_ps(a, b); }
inline vf vpow2i(vf n) { return _mm512_scalef_ps(vset1(1.f), n); }  // 2^n, n integral

inline vmask vgt(vf a, vf b) { return _mm512_cmp_ps_mask(a, b, _CMP_GT_OQ); }
inline vmask visnan(vf v) { return _mm512_cmp_ps_mask(v, v, _CMP_UNORD_Q); }
inline bool vany(vmask m) { return m != 0; }
inline vf vselect(vmask m, vf t, vf f) { return _mm512_mask_mov_ps(f, m, t); }

inline vi vizero() { return _mm512_setzero_si512(); }
inline vi vadd_i32(vi a, vi b) { return _mm512_add_epi32(a, b); }
inline vf vcvt(vi v) { return _mm512_cvtepi32_ps(v); }
inline vf vload_i8(const int8_t* p) {
  return _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))));
}
inline vbytes vload_bytes(const uint8_t* p) { return _mm512_loadu_si512(p); }
inline vbytes vlow_nibbles(vbytes v) { return _mm512_and_si512(v, _mm512_set1_epi8(0x0F)); }
inline vbytes vhigh_nibbles(vbytes v) { return _mm512_and_si512(_mm512_srli_epi16(v, 4), _mm512_set1_epi8(0x0F)); }

#if defined(__AVX512VNNI__)
constexpr int kByteDotOffset = 0;  // VPDPBUSD multiplies unsigned by signed bytes
using vcodes8 = __m512i;
inline vcodes8 vprep_bytes(vbytes u) { return u; }
inline vi vdot_bytes(vi acc, vcodes8 u, int32_t a4) { return _mm512_dpbusd_epi32(acc, u, _mm512_set1_epi32(a4)); }
using vnib = __m512i;  // int32 lanes: VPDPBUSD sums its fours itself
inline vnib vnib_zero() { return _mm512_setzero_si512(); }
inline vnib vnib_dot(vnib acc, vbytes u, int32_t a4) { return _mm512_dpbusd_epi32(acc, u, _mm512_set1_epi32(a4)); }
inline vi vnib_finish(vnib acc) { return acc; }
#else
constexpr int kByteDotOffset = 128;
// u - 128 as a signed byte s, |s| <= 127 for the codes 1..255: |s| times a with s's sign.
struct vcodes8 {
  __m512i abs;  // |u - 128|
  __mmask64 neg;  // u - 128 < 0
};
inline vcodes8 vprep_bytes(vbytes u) {
  const __m512i s = _mm512_xor_si512(u, _mm512_set1_epi8(static_cast<char>(0x80)));
  return {_mm512_abs_epi8(s), _mm512_movepi8_mask(s)};
}
inline vi vdot_bytes(vi acc, vcodes8 c, int32_t a4) {
  const __m512i a = _mm512_set1_epi32(a4);
  const __m512i a_signed = _mm512_mask_sub_epi8(a, c.neg, _mm512_setzero_si512(), a);
  const __m512i pairs = _mm512_maddubs_epi16(c.abs, a_signed);
  return _mm512_add_epi32(acc, _mm512_madd_epi16(pairs, _mm512_set1_epi16(1)));
}
using vnib = __m512i;  // int16 pair sums, widened to fours once per group
inline vnib vnib_zero() { return _mm512_setzero_si512(); }
inline vnib vnib_dot(vnib acc, vbytes u, int32_t a4) {
  return _mm512_add_epi16(acc, _mm512_maddubs_epi16(u, _mm512_set1_epi32(a4)));
}
inline vi vnib_finish(vnib acc) { return _mm512_madd_epi16(acc, _mm512_set1_epi16(1)); }
#endif

}  // namespace r1serve_vec
