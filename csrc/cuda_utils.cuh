#pragma once
// What the CUDA files share: the current stream, the SM count, the launch check.
#include <torch/extension.h>

// The current stream of x's device. Real CUDA builds use c10/cuda; torch's CPU-only headers
// (the nvcc compile check) lack c10/cuda's generated config, so they go through the generic
// device-guard interface, which resolves to the same stream at run time.
#if __has_include(<c10/cuda/impl/cuda_cmake_macros.h>)
#include <c10/cuda/CUDAStream.h>
inline cudaStream_t current_stream(const at::Tensor& x) {
  return c10::cuda::getCurrentCUDAStream(x.device().index()).stream();
}
#else
#include <c10/core/impl/DeviceGuardImplInterface.h>
inline cudaStream_t current_stream(const at::Tensor& x) {
  return static_cast<cudaStream_t>(
      c10::impl::getDeviceGuardImpl(c10::DeviceType::CUDA)->getStream(x.device()).native_handle());
}
#endif
// Streaming multiprocessors of a device (a cheap driver query, no cache needed).
inline int num_sms(int device) {
  int sms = 0;
  cudaDeviceGetAttribute(&sms, cudaDevAttrMultiProcessorCount, device);
  return sms > 0 ? sms : 1;
}
#define CUDA_LAUNCH_CHECK()                                                              \
  do {                                                                                   \
    cudaError_t err_ = cudaGetLastError();                                               \
    TORCH_CHECK(err_ == cudaSuccess, "CUDA kernel launch failed: ", cudaGetErrorString(err_)); \
  } while (0)
