// The only PYBIND11_MODULE: validate every input, dispatch on device, return.
// Shapes are 2-D here (the Python side flattens leading dims); dtypes must match x's.
#include <c10/core/DeviceGuard.h>

#include "checks.h"

using OptT = c10::optional<at::Tensor>;

std::vector<at::Tensor> norm_fwd_cpu(const at::Tensor& x, const OptT& residual, const at::Tensor& w, const OptT& b,
                                     double eps, bool rms);
std::vector<at::Tensor> norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& h, const OptT& dh, const at::Tensor& w,
                                     const at::Tensor& mean, const at::Tensor& rstd, bool has_bias, bool rms);
#ifdef WITH_CUDA
std::vector<at::Tensor> norm_fwd_cuda(const at::Tensor& x, const OptT& residual, const at::Tensor& w, const OptT& b,
                                      double eps, bool rms);
std::vector<at::Tensor> norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& h, const OptT& dh, const at::Tensor& w,
                                      const at::Tensor& mean, const at::Tensor& rstd, bool has_bias, bool rms);
std::vector<at::Tensor> gemm_cuda(const at::Tensor& a, const at::Tensor& b, const OptT& bias, int64_t act,
                                  bool save_preact);
at::Tensor act_bwd_cuda(const at::Tensor& dy, const at::Tensor& z, int64_t act);
#endif

namespace {

bool present(const OptT& t) { return t.has_value() && t->defined(); }

void check_device(const at::Tensor& x) {
  TORCH_CHECK(x.device().is_cpu() || x.device().is_cuda(), "x must be a CPU or CUDA tensor, got ", x.device());
#ifndef WITH_CUDA
  TORCH_CHECK(x.device().is_cpu(), "kernels._C was built without CUDA; x is on ", x.device());
#endif
}

std::vector<at::Tensor> norm_fwd(const at::Tensor& x, const OptT& residual, const at::Tensor& weight,
                                 const OptT& bias, double eps, bool rms) {
  CHECK_INPUT(x);
  check_device(x);
  TORCH_CHECK(x.dim() == 2, "x must be 2-D (rows, hidden), got ", x.sizes());
  const int64_t n = x.size(1);
  TORCH_CHECK(n > 0, "x's hidden size must be positive");
  CHECK_LIKE(weight, x);
  CHECK_SHAPE(weight, n);
  if (present(residual)) {
    CHECK_LIKE(*residual, x);
    TORCH_CHECK(residual->sizes() == x.sizes(), "residual must have x's shape ", x.sizes());
  }
  if (present(bias)) {
    CHECK_LIKE(*bias, x);
    CHECK_SHAPE(*bias, n);
  }
  TORCH_CHECK(eps >= 0, "eps must be non-negative");
  const OptT r = present(residual) ? residual : OptT(), b = present(bias) ? bias : OptT();
  const c10::DeviceGuard guard(x.device());
#ifdef WITH_CUDA
  if (x.is_cuda()) return norm_fwd_cuda(x, r, weight, b, eps, rms);
#endif
  return norm_fwd_cpu(x, r, weight, b, eps, rms);
}

std::vector<at::Tensor> norm_bwd(const at::Tensor& dy, const at::Tensor& h, const OptT& dh, const at::Tensor& weight,
                                 const at::Tensor& mean, const at::Tensor& rstd, bool has_bias, bool rms) {
  CHECK_INPUT(h);
  check_device(h);
  TORCH_CHECK(h.dim() == 2 && h.size(1) > 0, "h must be 2-D (rows, hidden), got ", h.sizes());
  const int64_t rows = h.size(0), n = h.size(1);
  CHECK_LIKE(dy, h);
  TORCH_CHECK(dy.sizes() == h.sizes(), "dy must have h's shape ", h.sizes());
  if (present(dh)) {
    CHECK_LIKE(*dh, h);
    TORCH_CHECK(dh->sizes() == h.sizes(), "dh must have h's shape ", h.sizes());
  }
  CHECK_LIKE(weight, h);
  CHECK_SHAPE(weight, n);
  for (const at::Tensor* s : {&mean, &rstd}) {
    TORCH_CHECK(s->scalar_type() == at::kFloat && s->is_contiguous() && s->device() == h.device(),
                "mean and rstd must be contiguous float32 on h's device");
    TORCH_CHECK(s->dim() == 1 && s->size(0) == rows, "mean and rstd must have one entry per row");
  }
  const OptT d = present(dh) ? dh : OptT();
  const c10::DeviceGuard guard(h.device());
#ifdef WITH_CUDA
  if (h.is_cuda()) return norm_bwd_cuda(dy, h, d, weight, mean, rstd, has_bias, rms);
#endif
  return norm_bwd_cpu(dy, h, d, weight, mean, rstd, has_bias, rms);
}

// a (M, K) @ b (N, K)^T + bias (N), activation act (0 none, 1 gelu, 2 gelu_tanh, 3 relu)
// -> {y, pre-activation z (only when save_preact and act != 0)}. bf16/fp16 on CUDA only.
std::vector<at::Tensor> gemm(const at::Tensor& a, const at::Tensor& b, const OptT& bias, int64_t act,
                             bool save_preact) {
  CHECK_INPUT(a);
  CHECK_LIKE(b, a);
  TORCH_CHECK(a.is_cuda(), "gemm: a must be a CUDA tensor (CPU uses torch's BLAS)");
  TORCH_CHECK(a.scalar_type() != at::kFloat, "gemm: a must be float16 or bfloat16");
  TORCH_CHECK(a.dim() == 2 && b.dim() == 2 && a.size(1) == b.size(1), "gemm: a (M, K) and b (N, K) expected, got ",
              a.sizes(), " and ", b.sizes());
  TORCH_CHECK(a.size(1) % 8 == 0, "gemm: K must be a multiple of 8, got ", a.size(1));
  for (const at::Tensor* t : {&a, &b})
    TORCH_CHECK(reinterpret_cast<uintptr_t>(t->data_ptr()) % 16 == 0, "gemm: operands must be 16-byte aligned");
  if (present(bias)) {
    CHECK_LIKE(*bias, a);
    CHECK_SHAPE(*bias, b.size(0));
  }
  TORCH_CHECK(act >= 0 && act <= 3, "gemm: act must be 0..3, got ", act);
#ifdef WITH_CUDA
  const c10::DeviceGuard guard(a.device());
  return gemm_cuda(a, b, present(bias) ? bias : OptT(), act, save_preact);
#else
  TORCH_CHECK(false, "kernels._C was built without CUDA");
#endif
}

// dz = dy * act'(z), elementwise
at::Tensor act_bwd(const at::Tensor& dy, const at::Tensor& z, int64_t act) {
  CHECK_INPUT(z);
  CHECK_LIKE(dy, z);
  TORCH_CHECK(dy.sizes() == z.sizes(), "act_bwd: dy must have z's shape ", z.sizes());
  TORCH_CHECK(z.is_cuda(), "act_bwd: z must be a CUDA tensor");
  TORCH_CHECK(act >= 0 && act <= 3, "act_bwd: act must be 0..3, got ", act);
#ifdef WITH_CUDA
  const c10::DeviceGuard guard(z.device());
  return act_bwd_cuda(dy, z, act);
#else
  TORCH_CHECK(false, "kernels._C was built without CUDA");
#endif
}

bool has_cuda() {
#ifdef WITH_CUDA
  return true;
#else
  return false;
#endif
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "gpt-engine hand-written kernels";
  m.def("norm_fwd", &norm_fwd, "LayerNorm/RMSNorm forward -> [y, x + residual or None, mean, rstd]", py::arg("x"),
        py::arg("residual"), py::arg("weight"), py::arg("bias"), py::arg("eps"), py::arg("rms"));
  m.def("norm_bwd", &norm_bwd, "LayerNorm/RMSNorm backward -> [dx, dweight, dbias or None]", py::arg("dy"),
        py::arg("h"), py::arg("dh"), py::arg("weight"), py::arg("mean"), py::arg("rstd"), py::arg("has_bias"),
        py::arg("rms"));
  m.def("gemm", &gemm, "a @ b.T + bias with a fused activation -> [y, pre-activation or None]", py::arg("a"),
        py::arg("b"), py::arg("bias"), py::arg("act"), py::arg("save_preact"));
  m.def("act_bwd", &act_bwd, "dy * act'(z)", py::arg("dy"), py::arg("z"), py::arg("act"));
  m.def("has_cuda", &has_cuda, "whether this build has the CUDA kernels");
}
