// ATen glue of the group-quantized weight GEMM (the kernel and the weight layout are
// group_quant_gemm.h). Activations and output are float32 or bf16.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "aten_types.h"
#include "group_quant_gemm.h"

using r1serve_kernels::kGroup;
using r1serve_kernels::kRows;

template <typename T>
static void run(const at::Tensor& x, const at::Tensor& packed, int64_t N, int64_t bits,
                const std::optional<at::Tensor>& bias, at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), G = (K + kGroup - 1) / kGroup, NB = (N + kRows - 1) / kRows;
  std::vector<r1serve_kernels::QuantRow> xs(M);
  const auto* xp = as_vec<T>(x);
  const auto* b = bias ? as_vec<T>(*bias) : nullptr;
  const uint8_t* w = packed.data_ptr<uint8_t>();
  auto* yp = as_vec_mut<T>(y);
  // One parallel region: each thread quantizes its share of the rows, all meet at a barrier,
  // then each streams its own contiguous run of row blocks. Two regions (one per phase) cost
  // a second fork and join, about 120 times a decode step.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), NB));
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
    for (int64_t m = t; m < M; m += n) r1serve_kernels::quantize_row(xp + m * K, K, G, xs[m]);
#pragma omp barrier
    const int64_t nb0 = NB * t / n, nb1 = NB * (t + 1) / n;
    if (bits == 4)
      r1serve_kernels::gemm_blocks<r1serve_vec_t<T>, 4>(w, N, G, xs, b, yp, nb0, nb1);
    else
      r1serve_kernels::gemm_blocks<r1serve_vec_t<T>, 8>(w, N, G, xs, b, yp, nb0, nb1);
  }
}

// x: (M, K) float32 or bf16; packed: (ceil(N/16), ceil(K/32), 320 or 576) uint8;
// bias: (N,) of x's dtype or None -> (M, N) of x's dtype
at::Tensor group_quant_linear(const at::Tensor& x, const at::Tensor& packed, int64_t N, int64_t bits,
                              const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(bits == 4 || bits == 8, "group_quant_linear: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "group_quant_linear: x must be a contiguous float32 or bf16 (M, K)");
  const int64_t K = x.size(1), G = (K + kGroup - 1) / kGroup, NB = (N + kRows - 1) / kRows;
  const int64_t T = bits == 4 ? r1serve_kernels::tile_bytes<4>() : r1serve_kernels::tile_bytes<8>();
  TORCH_CHECK(packed.dim() == 3 && packed.scalar_type() == at::kByte && packed.is_contiguous() &&
                  packed.size(0) == NB && packed.size(1) == G && packed.size(2) == T,
              "group_quant_linear: packed has shape ", packed.sizes(), ", expected (", NB, ", ", G, ", ", T, ")");
  TORCH_CHECK(!bias || (bias->scalar_type() == x.scalar_type() && bias->is_contiguous() && bias->numel() == N),
              "group_quant_linear: bias must be a contiguous (N,) of x's dtype");
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  if (x.scalar_type() == at::kBFloat16)
    run<at::BFloat16>(x, packed, N, bits, bias, y);
  else
    run<float>(x, packed, N, bits, bias, y);
  return y;
}
