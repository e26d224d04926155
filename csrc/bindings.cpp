// The only PYBIND11_MODULE: validate inputs, dispatch, return.
#include "checks.h"

std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd_cpu(const at::Tensor& x, const at::Tensor& w,
                                                                   const at::Tensor& b, double eps);

static std::tuple<at::Tensor, at::Tensor, at::Tensor> layer_norm_fwd(const at::Tensor& x, const at::Tensor& w,
                                                                     const at::Tensor& b, double eps) {
  CHECK_INPUT(x);
  CHECK_INPUT(w);
  CHECK_INPUT(b);
  CHECK_SAME_DEVICE(x, w);
  CHECK_SAME_DEVICE(x, b);
  TORCH_CHECK(w.dim() == 1 && w.size(0) == x.size(-1), "weight must be 1-D with x.size(-1) elements");
  TORCH_CHECK(b.dim() == 1 && b.size(0) == x.size(-1), "bias must be 1-D with x.size(-1) elements");
  TORCH_CHECK(x.device().is_cpu(), "layer_norm_fwd: only CPU tensors are supported by this build");
  return layer_norm_fwd_cpu(x, w, b, eps);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gpt-engine hand-written kernels";
  m.def("layer_norm_fwd", &layer_norm_fwd, "LayerNorm forward -> (y, mean, rstd)");
}
