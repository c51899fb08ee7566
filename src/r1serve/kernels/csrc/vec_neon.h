// vec.h for ARM64 NEON (Apple silicon, Graviton, Ampere): 4 floats per register. Integer
// dot products use SDOT where the CPU has dotprod (ARMv8.2+), else widening multiplies.
#pragma once

#include <arm_neon.h>

namespace r1serve_vec {

constexpr int kLanes = 4;
constexpr int kVecRegs = 32;  // architectural vector registers
constexpr const char* kIsa = "neon";

using vf = float32x4_t;
using vmask = uint32x4_t;
using vi = int32x4_t;
using vbytes = uint8x16_t;

inline vf vzero() { return vdupq_n_f32(0.f); }
inline vf vset1(float x) { return vdupq_n_f32(x); }
inline vf vload(const float* p) { return vld1q_f32(p); }
inline vf vload(const bf16* p) {
  return vreinterpretq_f32_u32(vshll_n_u16(vld1_u16(reinterpret_cast<const uint16_t*>(p)), 16));
}
inline vf vload_half(const uint16_t* p) { return vcvt_f32_f16(vreinterpret_f16_u16(vld1_u16(p))); }
inline void vstore(float* p, vf v) { vst1q_f32(p, v); }

// Round to nearest even in integers, NaN to 0x7FC0 (as vec_types.h's to_bf16).
inline uint16x4_t to_bf16_bits(vf v) {
  const uint32x4_t u = vreinterpretq_u32_f32(v);
  const uint32x4_t bias = vaddq_u32(vandq_u32(vshrq_n_u32(u, 16), vdupq_n_u32(1)), vdupq_n_u32(0x7FFF));
  uint32x4_t r = vshrq_n_u32(vaddq_u32(u, bias), 16);
  r = vbslq_u32(vmvnq_u32(vceqq_f32(v, v)), vdupq_n_u32(0x7FC0), r);
  return vmovn_u32(r);
}
inline void vstore(bf16* p, vf v) { vst1_u16(reinterpret_cast<uint16_t*>(p), to_bf16_bits(v)); }
inline vf vround(vf v, const float*) { return v; }
inline vf vround(vf v, const bf16*) { return vreinterpretq_f32_u32(vshll_n_u16(to_bf16_bits(v), 16)); }

inline vf vadd(vf a, vf b) { return vaddq_f32(a, b); }
inline vf vsub(vf a, vf b) { return vsubq_f32(a, b); }
inline vf vmul(vf a, vf b) { return vmulq_f32(a, b); }
inline vf vdiv(vf a, vf b) { return vdivq_f32(a, b); }
inline vf vfmadd(vf a, vf b, vf c) { return vfmaq_f32(c, a, b); }
inline vf vmax(vf a, vf b) { return vmaxq_f32(a, b); }
inline vf vabs(vf v) { return vabsq_f32(v); }
inline vf vrint(vf v) { return vrndnq_f32(v); }
inline void vstore_i8(int8_t* p, vf v) {
  const int16x4_t i16 = vmovn_s32(vcvtnq_s32_f32(v));
  vst1_lane_s32(reinterpret_cast<int32_t*>(p), vreinterpret_s32_s8(vmovn_s16(vcombine_s16(i16, i16))), 0);
}
inline float vhsum(vf v) { return vaddvq_f32(v); }
inline float vhmax(vf v) { return vmaxvq_f32(v); }

inline vf vmin(vf a, vf b) { return vminq_f32(a, b); }
// 2^n for integral n in -126..127, built in the exponent field
inline vf vpow2i(vf n) { return vreinterpretq_f32_s32(vshlq_n_s32(vaddq_s32(vcvtq_s32_f32(n), vdupq_n_s32(127)), 23)); }

inline vmask vgt(vf a, vf b) { return vcgtq_f32(a, b); }
inline vmask visnan(vf v) { return vmvnq_u32(vceqq_f32(v, v)); }
inline bool vany(vmask m) { return vmaxvq_u32(m) != 0; }
inline vf vselect(vmask m, vf t, vf f) { return vbslq_f32(m, t, f); }

inline vi vizero() { return vdupq_n_s32(0); }
inline vi vadd_i32(vi a, vi b) { return vaddq_s32(a, b); }
inline vf vcvt(vi v) { return vcvtq_f32_s32(v); }
inline vf vload_i8(const int8_t* p) {
  int32_t four;
  std::memcpy(&four, p, 4);
  const int16x8_t w = vmovl_s8(vreinterpret_s8_s32(vdup_n_s32(four)));
  return vcvtq_f32_s32(vmovl_s16(vget_low_s16(w)));
}
inline vbytes vload_bytes(const uint8_t* p) { return vld1q_u8(p); }
inline vbytes vlow_nibbles(vbytes v) { return vandq_u8(v, vdupq_n_u8(0x0F)); }
inline vbytes vhigh_nibbles(vbytes v) { return vshrq_n_u8(v, 4); }

// Signed bytes times signed bytes, summed in fours into each int32 lane.
inline vi dot4_signed(vi acc, int8x16_t s, int32_t a4) {
  const int8x16_t a = vreinterpretq_s8_s32(vdupq_n_s32(a4));
#if defined(__ARM_FEATURE_DOTPROD)
  return vdotq_s32(acc, s, a);
#else  // 16 products in int16 (|127 * 127 * 2| < 2^15 once paired), pairs, then pairs of pairs
  const int16x8_t lo = vmull_s8(vget_low_s8(s), vget_low_s8(a)), hi = vmull_high_s8(s, a);
  return vpadalq_s16(acc, vpaddq_s16(lo, hi));
#endif
}

#if defined(__ARM_FEATURE_DOTPROD)
using vnib = int32x4_t;  // SDOT sums its fours itself
inline vnib vnib_zero() { return vdupq_n_s32(0); }
inline vnib vnib_dot(vnib acc, vbytes u, int32_t a4) { return dot4_signed(acc, vreinterpretq_s8_u8(u), a4); }
inline vi vnib_finish(vnib acc) { return acc; }
#else
// Products accumulated in int16 (8 x 15 x 127 < 2^15), rows' fours summed once per group.
struct vnib {
  int16x8_t lo, hi;  // rows 0-1 and 2-3, four products each
};
inline vnib vnib_zero() { return {vdupq_n_s16(0), vdupq_n_s16(0)}; }
inline vnib vnib_dot(vnib acc, vbytes u, int32_t a4) {
  const int8x16_t s = vreinterpretq_s8_u8(u), a = vreinterpretq_s8_s32(vdupq_n_s32(a4));
  return {vmlal_s8(acc.lo, vget_low_s8(s), vget_low_s8(a)), vmlal_high_s8(acc.hi, s, a)};
}
inline vi vnib_finish(vnib acc) { return vpaddlq_s16(vpaddq_s16(acc.lo, acc.hi)); }
#endif

constexpr int kByteDotOffset = 128;  // SDOT is signed x signed: codes 1..255 go in as u - 128
using vcodes8 = int8x16_t;  // u - 128
inline vcodes8 vprep_bytes(vbytes u) { return vreinterpretq_s8_u8(veorq_u8(u, vdupq_n_u8(0x80))); }
inline vi vdot_bytes(vi acc, vcodes8 s, int32_t a4) { return dot4_signed(acc, s, a4); }

}  // namespace r1serve_vec
