// The CPU kernels as one Python module; each kernel lives in its own file.
#include <torch/extension.h>

at::Tensor paged_decode_attention(at::Tensor q, at::Tensor k_cache, at::Tensor v_cache, at::Tensor block_tables,
                                  at::Tensor seq_lens, double scale);
std::tuple<at::Tensor, at::Tensor> add_rms_norm(const std::optional<at::Tensor>& x, const at::Tensor& residual,
                                                const at::Tensor& weight, double eps);

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.def("paged_decode_attention", &paged_decode_attention, "decode attention over a paged KV cache");
  m.def("add_rms_norm", &add_rms_norm, "residual add + RMSNorm; returns (normed, new residual)");
}
