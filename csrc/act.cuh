#pragma once
// The GEMM epilogues' activations, in fp32: one definition for the mma.sync and the CUTLASS kernels.
#include <cuda_runtime.h>

enum Act { kNone = 0, kGelu = 1, kGeluTanh = 2, kRelu = 3 };

constexpr float kSqrtHalf = 0.70710678118654752f, kSqrt2OverPi = 0.79788456080286536f;
constexpr float kInvSqrt2Pi = 0.39894228040143268f, kTanhC = 0.044715f;

__host__ __device__ __forceinline__ float act_fwd(float x, int act) {
  if (act == kGelu) return 0.5f * x * (1.f + erff(x * kSqrtHalf));
  if (act == kGeluTanh) return 0.5f * x * (1.f + tanhf(kSqrt2OverPi * (x + kTanhC * x * x * x)));
  if (act == kRelu) return x > 0.f ? x : 0.f;
  return x;
}

__device__ __forceinline__ float act_grad(float x, int act) {
  if (act == kGelu) return 0.5f * (1.f + erff(x * kSqrtHalf)) + x * kInvSqrt2Pi * __expf(-0.5f * x * x);
  if (act == kGeluTanh) {
    const float th = tanhf(kSqrt2OverPi * (x + kTanhC * x * x * x));
    return 0.5f * (1.f + th) + 0.5f * x * (1.f - th * th) * kSqrt2OverPi * (1.f + 3.f * kTanhC * x * x);
  }
  if (act == kRelu) return x > 0.f ? 1.f : 0.f;
  return 1.f;
}

template <int ACT>
__device__ __forceinline__ float act_fwd(float x) {
  return act_fwd(x, ACT);  // ACT is a constant: the branches fold away
}
