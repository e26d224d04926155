#pragma once
#include <torch/extension.h>

// Input checks for the bindings: each names the argument it rejects.
#define CHECK_CONTIGUOUS(x) TORCH_CHECK((x).is_contiguous(), #x " must be contiguous")
#define CHECK_FLOAT(x)                                                                          \
  TORCH_CHECK((x).scalar_type() == at::kFloat || (x).scalar_type() == at::kHalf ||               \
                  (x).scalar_type() == at::kBFloat16,                                            \
              #x " must be float32, float16 or bfloat16, got ", (x).scalar_type())
#define CHECK_SAME_DEVICE(x, y) \
  TORCH_CHECK((x).device() == (y).device(), #x " and " #y " must be on the same device")
#define CHECK_SAME_DTYPE(x, y) \
  TORCH_CHECK((x).scalar_type() == (y).scalar_type(), #x " and " #y " must have the same dtype")
#define CHECK_INPUT(x) \
  CHECK_CONTIGUOUS(x); \
  CHECK_FLOAT(x)
// x checked like CHECK_INPUT and on ref's device with ref's dtype
#define CHECK_LIKE(x, ref)     \
  CHECK_INPUT(x);              \
  CHECK_SAME_DEVICE(x, ref);   \
  CHECK_SAME_DTYPE(x, ref)
#define CHECK_SHAPE(x, ...) \
  TORCH_CHECK((x).sizes() == at::IntArrayRef({__VA_ARGS__}), #x " must have shape (" #__VA_ARGS__ "), got ", (x).sizes())

#ifdef __CUDACC__
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
#endif
