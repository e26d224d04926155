// F.linear's weight gradient on Hopper: d (N, K) = dz (M, N)^T @ x (M, K), reduced over the
// rows M; dz is the M-contiguous (ColMajor) A operand and x the RowMajor B: no transposed copies.
#include "gemm_sm90.cuh"

void sm90_gemm_wgrad(const at::Tensor& dz, const at::Tensor& x, at::Tensor& d) {
  const int M = dz.size(0), N = dz.size(1), K = x.size(1);
  sm90::run_typed<sm90::ColMajor, sm90::RowMajor>(dz, x, nullptr, kNone, d, N, K, M);
}
