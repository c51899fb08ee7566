// ATen glue of the quantized weights: the GEMM (quant_gemm.h), packing from GGUF blocks
// (gguf_repack.h) and from floats, and rows back to floats (quant_weight.h).
//
// A linear's weight is `packed` (1-D uint8) with a `segments` table (S, 4) int64 of
// [format, first output row, rows, byte offset]: a fused projection whose parts were stored
// in different block formats (Q4_K_M's q and k in Q4_K, v in Q6_K) is one weight of several
// segments, served by one call.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <omp.h>

#include <algorithm>
#include <optional>
#include <vector>

#include "aten_types.h"
#include "gguf_repack.h"
#include "quant_gemm.h"
#include "quant_weight.h"

namespace rk = r1serve_kernels;

static std::vector<rk::Segment> read_segments(const at::Tensor& packed, const at::Tensor& segments, int64_t N,
                                              int64_t K) {
  TORCH_CHECK(packed.dim() == 1 && packed.scalar_type() == at::kByte && packed.is_contiguous(),
              "quant_linear: packed must be a contiguous 1-D uint8 tensor");
  TORCH_CHECK(segments.dim() == 2 && segments.size(1) == 4 && segments.scalar_type() == at::kLong &&
                  segments.is_contiguous() && segments.device().is_cpu(),
              "quant_linear: segments must be a contiguous (S, 4) int64 CPU tensor");
  std::vector<rk::Segment> out;
  const int64_t* s = segments.data_ptr<int64_t>();
  const uint8_t* base = packed.data_ptr<uint8_t>();
  for (int64_t i = 0; i < segments.size(0); ++i, s += 4) {
    TORCH_CHECK(s[0] >= 0 && s[0] <= 3, "quant_linear: segment ", i, " has format ", s[0], ", not 0..3");
    const auto fmt = static_cast<rk::Fmt>(s[0]);
    const bool two_level = fmt == rk::Fmt::K4 || fmt == rk::Fmt::K8;
    TORCH_CHECK(!two_level || K % (rk::kGroup * rk::kSuperGroups) == 0, "quant_linear: K=", K,
                " must be a multiple of 256 for the K formats");
    const int64_t bytes = (s[2] + rk::kRows - 1) / rk::kRows * rk::block_bytes(fmt, K);
    TORCH_CHECK(s[1] >= 0 && s[2] > 0 && s[1] + s[2] <= N && s[3] >= 0 && s[3] + bytes <= packed.numel(),
                "quant_linear: segment ", i, " (rows ", s[1], "+", s[2], " at byte ", s[3],
                ") does not fit N=", N, " and ", packed.numel(), " packed bytes");
    out.push_back({fmt, s[1], s[2], base + s[3]});
  }
  return out;
}

// Output rows that no segment covers are 0 (none do, for a whole weight or its fused parts:
// zeroing all of y cost an (M, N) memset a call).
static void zero_uncovered(at::Tensor& y, std::vector<rk::Segment> segs) {
  std::sort(segs.begin(), segs.end(), [](const rk::Segment& a, const rk::Segment& b) { return a.row0 < b.row0; });
  int64_t at = 0;
  for (const auto& s : segs) {
    if (s.row0 > at) y.narrow(1, at, s.row0 - at).zero_();
    at = std::max(at, s.row0 + s.rows);
  }
  if (at < y.size(1)) y.narrow(1, at, y.size(1) - at).zero_();
}

// The calling thread's int8 activations, kept across calls (a decode step makes ~120; a
// prefill's are megabytes): grown, never cleared, as quantize_row writes all of its rows.
static rk::QuantRows& activation_buffer() {
  thread_local rk::QuantRows xs;
  return xs;
}

template <typename T>
static void run(const at::Tensor& x, const std::vector<rk::Segment>& segs, const std::optional<at::Tensor>& bias,
                at::Tensor& y) {
  const int64_t M = x.size(0), K = x.size(1), G = (K + rk::kGroup - 1) / rk::kGroup, N = y.size(1);
  rk::QuantRows& xs = activation_buffer();  // a reference: the parallel region shares it
  xs.resize(M, G);
  const auto* xp = as_vec<T>(x);
  const auto* b = bias ? as_vec<T>(*bias) : nullptr;
  auto* yp = as_vec_mut<T>(y);
  int64_t blocks = 0;
  for (const auto& s : segs) blocks += s.blocks();
  // One parallel region: each thread quantizes its share of the rows, all meet at a barrier,
  // then each streams its own contiguous share of the blocks. Two regions (one per phase)
  // cost a second fork and join, about 120 times a decode step.
  const int64_t threads = std::max<int64_t>(1, std::min<int64_t>(at::get_num_threads(), blocks));
#pragma omp parallel num_threads(threads)
  {
    const int64_t t = omp_get_thread_num(), n = omp_get_num_threads();
    // Contiguous rows a thread: rows side by side share the group-major layout's cache lines.
    for (int64_t m = M * t / n; m < M * (t + 1) / n; ++m) rk::quantize_row(xp + m * K, K, xs, m);
#pragma omp barrier
    rk::gemm_share<r1serve_vec_t<T>>(segs, rk::share_of(segs, K, t, n), K, xs, b, yp, N);
  }
}

// x: (M, K) float32 or bf16; packed, segments: as above -> (M, N) of x's dtype
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& segments, int64_t N,
                        const std::optional<at::Tensor>& bias) {
  TORCH_CHECK(x.dim() == 2 && x.is_contiguous() && (x.scalar_type() == at::kBFloat16 || x.scalar_type() == at::kFloat),
              "quant_linear: x must be a contiguous float32 or bf16 (M, K)");
  TORCH_CHECK(!bias || (bias->scalar_type() == x.scalar_type() && bias->is_contiguous() && bias->numel() == N),
              "quant_linear: bias must be a contiguous (N,) of x's dtype");
  const auto segs = read_segments(packed, segments, N, x.size(1));
  at::Tensor y = at::empty({x.size(0), N}, x.options());
  zero_uncovered(y, segs);
  if (x.scalar_type() == at::kBFloat16)
    run<at::BFloat16>(x, segs, bias, y);
  else
    run<float>(x, segs, bias, y);
  return y;
}

// raw: (rows, row_bytes) uint8, each row K / block_cols ggml blocks of `ggml_type` -> the
// packed row blocks of its target format (gguf_repack.h), written into `out` (1-D uint8,
// exactly their size: one segment of a weight being built; every byte is written). Row blocks are repacked
// in parallel, each from its own 16 rows.
void repack_gguf(const at::Tensor& raw, int64_t ggml_type, at::Tensor& out) {
  TORCH_CHECK(raw.dim() == 2 && raw.scalar_type() == at::kByte && raw.stride(1) == 1,
              "repack_gguf: raw must be a (rows, row_bytes) uint8 tensor with contiguous rows");
  rk::BlockFormat bf;
  try {
    bf = rk::block_format(static_cast<int>(ggml_type));
  } catch (const std::invalid_argument& e) {
    TORCH_CHECK(false, "repack_gguf: ", e.what());
  }
  const int64_t rows = raw.size(0), row_bytes = raw.size(1);
  TORCH_CHECK(row_bytes % bf.block_bytes == 0, "repack_gguf: rows of ", row_bytes,
              " bytes are not whole blocks of ", bf.block_bytes);
  const int64_t units = row_bytes / bf.block_bytes, K = units * bf.block_cols;
  const int64_t per_block = rk::block_bytes(bf.target, K), NB = (rows + rk::kRows - 1) / rk::kRows;
  TORCH_CHECK(out.dim() == 1 && out.scalar_type() == at::kByte && out.is_contiguous() && out.numel() == NB * per_block,
              "repack_gguf: out must be a contiguous 1-D uint8 tensor of ", NB * per_block, " bytes");
  const uint8_t* src = raw.data_ptr<uint8_t>();
  const int64_t stride = raw.stride(0);
  uint8_t* dst = out.data_ptr<uint8_t>();
  at::parallel_for(0, NB, 1, [&](int64_t nb0, int64_t nb1) {
    for (int64_t nb = nb0; nb < nb1; ++nb) rk::repack_block(bf, src, stride, rows, units, nb, dst + nb * per_block);
  });
}


// w: (N, K) float32 or bf16 -> G4 (bits 4) or G8 (bits 8) row blocks, written into `out`
// (1-D uint8, exactly their size; every byte is written).
void quantize_weight(const at::Tensor& w, int64_t bits, at::Tensor& out) {
  TORCH_CHECK(bits == 4 || bits == 8, "quantize_weight: bits must be 4 or 8, got ", bits);
  TORCH_CHECK(w.dim() == 2 && w.stride(1) == 1 && (w.scalar_type() == at::kBFloat16 || w.scalar_type() == at::kFloat),
              "quantize_weight: w must be a float32 or bf16 (N, K) with contiguous rows");
  const int64_t N = w.size(0), K = w.size(1), NB = (N + rk::kRows - 1) / rk::kRows;
  const int64_t per_block = rk::block_bytes(bits == 4 ? rk::Fmt::G4 : rk::Fmt::G8, K);
  TORCH_CHECK(out.dim() == 1 && out.scalar_type() == at::kByte && out.is_contiguous() && out.numel() == NB * per_block,
              "quantize_weight: out must be a contiguous 1-D uint8 tensor of ", NB * per_block, " bytes");
  uint8_t* dst = out.data_ptr<uint8_t>();
  try {  // at::parallel_for rethrows a worker's exception here
    at::parallel_for(0, NB, 1, [&](int64_t nb0, int64_t nb1) {
      for (int64_t nb = nb0; nb < nb1; ++nb) {
        if (w.scalar_type() == at::kBFloat16)
          rk::quantize_block(as_vec<at::BFloat16>(w), w.stride(0), N, K, bits, nb, dst + nb * per_block);
        else
          rk::quantize_block(as_vec<float>(w), w.stride(0), N, K, bits, nb, dst + nb * per_block);
      }
    });
  } catch (const std::range_error& e) {
    TORCH_CHECK(false, "quantize_weight: ", e.what());
  }
}

// The output rows `ids` (int64, any shape) of a packed weight as float32 (ids.numel(), K):
// an embedding looked up in its quantized table.
at::Tensor dequantize_rows(const at::Tensor& packed, const at::Tensor& segments, int64_t N, int64_t K,
                           const at::Tensor& ids) {
  const auto segs = read_segments(packed, segments, N, K);
  TORCH_CHECK(ids.scalar_type() == at::kLong, "dequantize_rows: ids must be int64");
  const at::Tensor flat = ids.reshape({-1}).contiguous();
  const int64_t M = flat.numel();
  const int64_t* id = flat.data_ptr<int64_t>();
  for (int64_t i = 0; i < M; ++i) TORCH_CHECK(id[i] >= 0 && id[i] < N, "dequantize_rows: row ", id[i], " not in 0..", N);
  at::Tensor out = at::zeros({M, K}, packed.options().dtype(at::kFloat));
  float* o = out.data_ptr<float>();
  at::parallel_for(0, M, 16, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i)
      for (const auto& s : segs) {
        if (id[i] < s.row0 || id[i] >= s.row0 + s.rows) continue;
        const int64_t r = id[i] - s.row0;
        const uint8_t* block = s.packed + r / rk::kRows * rk::block_bytes(s.fmt, K);
        rk::dequantize_block_row(s.fmt, block, r % rk::kRows, K, o + i * K);
      }
  });
  return out;
}
