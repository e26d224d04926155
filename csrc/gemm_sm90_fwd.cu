// F.linear's forward on Hopper: d = act(a @ b^T + bias), both operands K-contiguous.
#include "gemm_sm90.cuh"

void sm90_gemm_fwd(const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& bias, int act,
                   at::Tensor& d) {
  const int M = a.size(0), K = a.size(1), N = b.size(0);
  sm90::run_typed<sm90::RowMajor, sm90::ColMajor>(a, b, bias.has_value() ? bias->data_ptr() : nullptr, act, d, M, N,
                                                  K);
}
