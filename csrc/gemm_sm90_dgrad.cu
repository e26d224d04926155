// F.linear's input gradient on Hopper: d (M, K) = dz (M, N) @ w (N, K). As a GEMM over the
// reduction dim N, w is the N-contiguous (RowMajor) B operand: no transposed copy of w.
#include "gemm_sm90.cuh"

void sm90_gemm_dgrad(const at::Tensor& dz, const at::Tensor& w, at::Tensor& d) {
  const int M = dz.size(0), N = dz.size(1), K = w.size(1);
  sm90::run_typed<sm90::RowMajor, sm90::RowMajor>(dz, w, nullptr, kNone, d, M, K, N);
}
