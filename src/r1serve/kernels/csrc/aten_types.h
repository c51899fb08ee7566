// ATen's element types as the vector layer's (vec_types.h): at::BFloat16 and r1serve_vec::bf16
// are the same 16 bits, so a tensor's data pointer is handed to the kernel cores as is.
#pragma once

#include <ATen/ATen.h>

#include <type_traits>

#include "vec_types.h"

static_assert(sizeof(at::BFloat16) == sizeof(r1serve_vec::bf16) && alignof(at::BFloat16) == alignof(r1serve_vec::bf16),
              "at::BFloat16 must be 16 bits");

template <typename T>
using r1serve_vec_t = std::conditional_t<std::is_same_v<T, at::BFloat16>, r1serve_vec::bf16, T>;

template <typename T>
const r1serve_vec_t<T>* as_vec(const at::Tensor& t) {
  return reinterpret_cast<const r1serve_vec_t<T>*>(t.data_ptr<T>());
}
template <typename T>
r1serve_vec_t<T>* as_vec_mut(at::Tensor& t) {
  return reinterpret_cast<r1serve_vec_t<T>*>(t.data_ptr<T>());
}
