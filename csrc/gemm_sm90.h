#pragma once
// Hopper (sm_90a) GEMMs from CUTLASS collectives, compiled when setup.py finds CUTLASS's headers
// (it then defines GPT_ENGINE_CUTLASS). All tensors are contiguous row-major bf16/fp16 on one
// CUDA device with every leading dimension a multiple of 8 (TMA needs 16-byte strides): the
// callers in gemm.cu check that and fall back to the mma.sync kernel otherwise.
#include <ATen/ATen.h>

// d (M, N) = act(a (M, K) @ b (N, K)^T + bias (N))      F.linear's forward, bias optional
void sm90_gemm_fwd(const at::Tensor& a, const at::Tensor& b, const c10::optional<at::Tensor>& bias, int act,
                   at::Tensor& d);
// d (M, K) = dz (M, N) @ w (N, K)                       F.linear's input gradient
void sm90_gemm_dgrad(const at::Tensor& dz, const at::Tensor& w, at::Tensor& d);
// d (N, K) = dz (M, N)^T @ x (M, K)                     F.linear's weight gradient
void sm90_gemm_wgrad(const at::Tensor& dz, const at::Tensor& x, at::Tensor& d);
