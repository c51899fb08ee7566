// The one vector layer every CPU kernel is written over. The compiler's target picks one
// header: AVX512 (F, BW, DQ, VL; plus BF16 and VNNI where present), AVX2 + FMA + F16C (plus
// AVX-VNNI where present), ARM64 NEON (plus dotprod where present), or a portable scalar
// one. Each defines, in namespace r1serve_vec:
//
//   kLanes, kIsa                  floats per register; the ISA's name ("avx512", ...)
//   kVecRegs                      architectural vector registers (sizes register blocking)
//   vf                            kLanes floats
//     vzero vset1 vload(float* | bf16*) vload_half(fp16 bits*) vstore(float* | bf16*, v)
//     vround(v, T*)               v rounded to T and back (identity for float)
//     vadd vsub vmul vdiv vfmadd(a, b, c) = a * b + c  vmax vmin  vabs  vhsum vhmax
//     vpow2i(n)                   2^n for integral n in -126..127
//     vrint(v)                    rounded to the nearest integer, ties to even (as torch.round)
//     vstore_i8(int8_t*, v)       kLanes integral values in -128..127 as int8
//   vmask                         a per-lane condition: vgt(a, b) visnan(v) vany(m) vselect(m, t, f)
//   vi                            kLanes int32: vizero vadd_i32 vcvt(vi) -> vf
//   vload_i8(int8_t*)             kLanes signed bytes as floats (the K formats' small scales)
//   vbytes                        4 * kLanes bytes (kLanes rows of 4 codes each)
//     vload_bytes vlow_nibbles vhigh_nibbles
//     vprep_bytes(u) -> vcodes8   8-bit codes made ready for vdot_bytes (once per load, for
//                                 every activation row)
//     vdot_bytes(acc, c, a4)      acc + sum_j u[4 lane + j] a4[j] for u in 0..255, less
//                                 kByteDotOffset * sum_j a4[j] (the ISAs without an unsigned x
//                                 signed dot product take u - 128 as a signed byte)
//   vnib                          a group's partial sums of small codes' products (per lane:
//                                 sum_j u[4 lane + j] * a4[j]), exact for up to 8 vnib_dot
//                                 calls with u in 0..15, or 2 with u in 0..63: int16 pairs where the
//                                 ISA multiplies bytes into int16 (AVX2, NEON without dotprod),
//                                 int32 lanes where it has a 4-way dot product
//     vnib_zero vnib_dot(acc, u, a4) vnib_finish(acc) -> vi
//
// The kernels are written once over these and hold no #ifdef of their own. Define
// R1SERVE_VEC_SCALAR to build the scalar header on any CPU (the test build of it).
#pragma once

#include "vec_types.h"

#if defined(R1SERVE_VEC_SCALAR)
#include "vec_scalar.h"
#elif defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512DQ__) && defined(__AVX512VL__)
#include "vec_avx512.h"
#elif defined(__AVX2__) && defined(__FMA__) && defined(__F16C__)
#include "vec_avx2.h"
#elif defined(__aarch64__) && defined(__ARM_NEON)
#include "vec_neon.h"
#else
#include "vec_scalar.h"
#endif

namespace r1serve_vec {

// exp(x) = 2^n exp(r), n = round(x / ln 2), r = x - n ln 2 (ln 2 split in two for
// precision); a Cephes polynomial, ~2 ulp of float32. The C library's scalar exp made the
// kernels using it several times slower.
inline vf vexp(vf x) {
  using namespace exp_poly;
  x = vmin(vmax(x, vset1(kLo)), vset1(kHi));
  const vf n = vrint(vmul(x, vset1(kLog2e)));
  vf r = vfmadd(n, vset1(-kLn2Hi), x);
  r = vfmadd(n, vset1(-kLn2Lo), r);
  vf p = vset1(kP0);
  p = vfmadd(p, r, vset1(kP1));
  p = vfmadd(p, r, vset1(kP2));
  p = vfmadd(p, r, vset1(kP3));
  p = vfmadd(p, r, vset1(kP4));
  p = vfmadd(p, r, vset1(kP5));
  p = vfmadd(p, vmul(r, r), vadd(r, vset1(1.f)));
  return vmul(p, vpow2i(n));
}

// The extensions beyond the base ISA this build uses, for `r1serve info`.
inline const char* isa_extensions() {
#if defined(R1SERVE_VEC_SCALAR)
  return "";
#elif defined(__AVX512F__) && defined(__AVX512BF16__) && defined(__AVX512VNNI__)
  return "bf16 vnni";
#elif defined(__AVX512F__) && defined(__AVX512VNNI__)
  return "vnni";
#elif defined(__AVX512F__) && defined(__AVX512BF16__)
  return "bf16";
#elif defined(__AVX2__) && defined(__AVXVNNI__)
  return "avx-vnni";
#elif defined(__aarch64__) && defined(__ARM_FEATURE_DOTPROD)
  return "dotprod";
#else
  return "";
#endif
}

// A store of the first n (< kLanes) lanes, for row tails.
template <typename T>
inline void vstore_first(T* p, vf v, int n) {
  T tmp[kLanes];
  vstore(tmp, v);
  for (int i = 0; i < n; ++i) p[i] = tmp[i];
}

}  // namespace r1serve_vec
