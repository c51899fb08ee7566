// The CPU kernels as one Python module; each kernel lives in its own file.
#include <torch/extension.h>

#include "vec.h"

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
                                  at::Tensor seq_lens, double scale);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const std::optional<at::Tensor>& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps);
at::Tensor rotary_kv_write(const at::Tensor& qkv, const at::Tensor& cos, const at::Tensor& sin, at::Tensor& kv_cache,
                           const at::Tensor& slots, int64_t num_heads);
at::Tensor silu_and_mul(const at::Tensor& x);
at::Tensor argmax_rows(const at::Tensor& logits);
at::Tensor quant_linear(const at::Tensor& x, const at::Tensor& packed, const at::Tensor& segments, int64_t N,
                        const std::optional<at::Tensor>& bias);
void repack_gguf(const at::Tensor& raw, int64_t ggml_type, at::Tensor& out);
void quantize_weight(const at::Tensor& w, int64_t bits, at::Tensor& out);
at::Tensor dequantize_rows(const at::Tensor& packed, const at::Tensor& segments, int64_t N, int64_t K,
                           const at::Tensor& ids);

// Every kernel works on tensors only, so each releases the GIL while it runs: a server's
// event loop keeps answering while an engine on a thread of its process is inside a kernel.
PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  using release_gil = py::call_guard<py::gil_scoped_release>;
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache", release_gil());
  m.def("add_rms_norm", &add_rms_norm, "residual add + RMSNorm; returns (normed, new residual)", release_gil());
  m.def("quant_linear", &quant_linear, "x @ W^T + b with W packed in segments of quantized formats (x float32 or bf16)",
        release_gil());
  m.def("repack_gguf", &repack_gguf, "a GGUF tensor's rows of blocks -> its packed row blocks, into out", release_gil());
  m.def("quantize_weight", &quantize_weight, "a float (N, K) weight -> int4 or int8 groups of 32, packed into out", release_gil());
  m.def("dequantize_rows", &dequantize_rows, "rows of a packed weight as float32", release_gil());
  m.def("rotary_kv_write", &rotary_kv_write, "split qkv, rotate q and k, store k and v in the paged cache; returns q", release_gil());
  m.def("silu_and_mul", &silu_and_mul, "silu(gate) * up over rows [gate | up]", release_gil());
  m.def("argmax_rows", &argmax_rows, "first index of each row's maximum (NaN counts as the maximum)", release_gil());
  m.def("isa", [] { return std::string(r1serve_vec::kIsa); }, "the vector ISA this build's kernels use");
  m.def("isa_extensions", [] { return std::string(r1serve_vec::isa_extensions()); },
        "the extensions beyond the base ISA it uses (bf16, vnni, dotprod, ...)");
}
