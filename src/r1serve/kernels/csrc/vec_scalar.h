// vec.h without vector instructions: 4 floats per "register" as plain arrays, for CPUs
// none of the other headers fit (and, with R1SERVE_VEC_SCALAR, for testing the kernels'
// structure apart from any ISA). The compiler may still vectorise the loops.
#pragma once

namespace r1serve_vec {

constexpr int kLanes = 4;
constexpr int kVecRegs = 16;  // architectural vector registers
constexpr const char* kIsa = "scalar";

struct vf {
  float v[kLanes];
};
struct vmask {
  bool v[kLanes];
};
struct vi {
  int32_t v[kLanes];
};
struct vbytes {
  uint8_t v[4 * kLanes];
};

template <typename F>
inline vf vmap(F f) {
  vf r;
  for (int i = 0; i < kLanes; ++i) r.v[i] = f(i);
  return r;
}

inline vf vzero() { return vmap([](int) { return 0.f; }); }
inline vf vset1(float x) { return vmap([x](int) { return x; }); }
template <typename T>
inline vf vload(const T* p) {
  return vmap([p](int i) { return to_float(p[i]); });
}
inline vf vload_half(const uint16_t* p) { return vmap([p](int i) { return half_to_float(p[i]); }); }
template <typename T>
inline void vstore(T* p, vf v) {
  for (int i = 0; i < kLanes; ++i) p[i] = from_float<T>(v.v[i]);
}
template <typename T>
inline vf vround(vf v, const T*) {
  return vmap([&v](int i) { return to_float(from_float<T>(v.v[i])); });
}

inline vf vadd(vf a, vf b) { return vmap([&](int i) { return a.v[i] + b.v[i]; }); }
inline vf vsub(vf a, vf b) { return vmap([&](int i) { return a.v[i] - b.v[i]; }); }
inline vf vmul(vf a, vf b) { return vmap([&](int i) { return a.v[i] * b.v[i]; }); }
inline vf vdiv(vf a, vf b) { return vmap([&](int i) { return a.v[i] / b.v[i]; }); }
inline vf vfmadd(vf a, vf b, vf c) { return vmap([&](int i) { return std::fma(a.v[i], b.v[i], c.v[i]); }); }
inline vf vmax(vf a, vf b) { return vmap([&](int i) { return a.v[i] > b.v[i] ? a.v[i] : b.v[i]; }); }
inline vf vabs(vf v) { return vmap([&v](int i) { return std::fabs(v.v[i]); }); }
inline vf vrint(vf v) { return vmap([&v](int i) { return std::nearbyint(v.v[i]); }); }
inline void vstore_i8(int8_t* p, vf v) {
  for (int i = 0; i < kLanes; ++i) p[i] = static_cast<int8_t>(v.v[i]);
}
inline float vhsum(vf v) {
  float s = 0.f;
  for (int i = 0; i < kLanes; ++i) s += v.v[i];
  return s;
}
inline float vhmax(vf v) {
  float m = v.v[0];
  for (int i = 1; i < kLanes; ++i) m = v.v[i] > m ? v.v[i] : m;
  return m;
}
inline vf vmin(vf a, vf b) { return vmap([&](int i) { return a.v[i] < b.v[i] ? a.v[i] : b.v[i]; }); }
inline vf vpow2i(vf n) { return vmap([&n](int i) { return std::ldexp(1.f, static_cast<int>(n.v[i])); }); }

inline vmask vgt(vf a, vf b) {
  vmask m;
  for (int i = 0; i < kLanes; ++i) m.v[i] = a.v[i] > b.v[i];
  return m;
}
inline vmask visnan(vf v) {
  vmask m;
  for (int i = 0; i < kLanes; ++i) m.v[i] = std::isnan(v.v[i]);
  return m;
}
inline bool vany(vmask m) {
  for (int i = 0; i < kLanes; ++i)
    if (m.v[i]) return true;
  return false;
}
inline vf vselect(vmask m, vf t, vf f) { return vmap([&](int i) { return m.v[i] ? t.v[i] : f.v[i]; }); }

inline vi vizero() { return vi{}; }
inline vi vadd_i32(vi a, vi b) {
  for (int i = 0; i < kLanes; ++i) a.v[i] += b.v[i];
  return a;
}
inline vf vcvt(vi v) { return vmap([&v](int i) { return static_cast<float>(v.v[i]); }); }
inline vf vload_i8(const int8_t* p) { return vmap([p](int i) { return static_cast<float>(p[i]); }); }
inline vbytes vload_bytes(const uint8_t* p) {
  vbytes b;
  std::memcpy(b.v, p, sizeof b.v);
  return b;
}
inline vbytes vlow_nibbles(vbytes b) {
  for (auto& x : b.v) x &= 0x0F;
  return b;
}
inline vbytes vhigh_nibbles(vbytes b) {
  for (auto& x : b.v) x >>= 4;
  return b;
}

constexpr int kByteDotOffset = 0;
inline vi vdot_u8(vi acc, vbytes u, int32_t a4) {
  int8_t a[4];
  std::memcpy(a, &a4, 4);
  for (int i = 0; i < kLanes; ++i)
    for (int j = 0; j < 4; ++j) acc.v[i] += static_cast<int32_t>(u.v[4 * i + j]) * a[j];
  return acc;
}
using vnib = vi;
inline vnib vnib_zero() { return vi{}; }
inline vnib vnib_dot(vnib acc, vbytes u, int32_t a4) { return vdot_u8(acc, u, a4); }
inline vi vnib_finish(vnib acc) { return acc; }
using vcodes8 = vbytes;
inline vcodes8 vprep_bytes(vbytes u) { return u; }
inline vi vdot_bytes(vi acc, vcodes8 u, int32_t a4) { return vdot_u8(acc, u, a4); }

}  // namespace r1serve_vec
