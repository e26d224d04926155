#pragma once
// One CUTLASS 3 GEMM configuration for Hopper, instantiated per dtype and operand layout by
// gemm_sm90_{fwd,dgrad,wgrad}.cu (one file each so they compile in parallel).
//
// TMA loads into a multistage shared-memory ring filled by a producer warp; two consumer
// warpgroups run wgmma on alternate output tiles ("ping-pong"), so one tile's epilogue overlaps
// the other's main loop, which matters for GPT-sized K (768: a dozen k-steps per tile). The
// epilogue (bias + activation, both chosen at run time) is CUTLASS's visitor tree with our
// activation as its last node, so one kernel serves every F.linear epilogue.
#include <cutlass/cutlass.h>
#include <cutlass/epilogue/collective/collective_builder.hpp>
#include <cutlass/epilogue/fusion/operations.hpp>
#include <cutlass/gemm/collective/collective_builder.hpp>
#include <cutlass/gemm/device/gemm_universal_adapter.h>
#include <cutlass/gemm/kernel/gemm_universal.hpp>
#include <cutlass/util/packed_stride.hpp>

#include <cute/tensor.hpp>

#include "act.cuh"
#include "cuda_utils.cuh"
#include "gemm_sm90.h"

namespace sm90 {

using namespace cute;
using RowMajor = cutlass::layout::RowMajor;
using ColMajor = cutlass::layout::ColumnMajor;

// Activation picked by an argument (CUTLASS passes a compute node's Arguments to its functor).
template <class T>
struct RuntimeAct {
  struct Arguments {
    int act = kNone;
  };
  CUTLASS_HOST_DEVICE T operator()(T const& x, Arguments const& args = Arguments()) const {
    return act_fwd(x, args.act);
  }
};

template <class T, int N>
struct RuntimeAct<cutlass::Array<T, N>> {
  using Arguments = typename RuntimeAct<T>::Arguments;
  CUTLASS_HOST_DEVICE cutlass::Array<T, N> operator()(cutlass::Array<T, N> const& x,
                                                      Arguments const& args = Arguments()) const {
    cutlass::Array<T, N> y;
    if (args.act == kNone) return x;  // uniform over the kernel: no divergence
    CUTLASS_PRAGMA_UNROLL
    for (int i = 0; i < N; ++i) y[i] = act_fwd(x[i], args.act);
    return y;
  }
};

// Element: cutlass::bfloat16_t or cutlass::half_t. LayoutA/B in CUTLASS's (M, K) / (K, N) sense:
// F.linear's forward is RowMajor x ColMajor (both K-contiguous), dgrad RowMajor x RowMajor,
// wgrad ColMajor x RowMajor. D is always RowMajor (M, N).
template <class Element, class LayoutA, class LayoutB>
struct Gemm {
  static constexpr int kAlign = 8;  // 16 bytes
  using Tile = Shape<_128, _128, _64>;
  using Cluster = Shape<_2, _1, _1>;  // two CTAs along M share (multicast) each B tile
  using Fusion = cutlass::epilogue::fusion::LinCombPerColBiasEltAct<RuntimeAct, Element, float, Element, void, float>;
  using Epilogue = typename cutlass::epilogue::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Tile, Cluster,
      cutlass::epilogue::collective::EpilogueTileAuto, float, float, void, RowMajor, kAlign, Element, RowMajor,
      kAlign, cutlass::epilogue::TmaWarpSpecialized, Fusion>::CollectiveOp;
  using Mainloop = typename cutlass::gemm::collective::CollectiveBuilder<
      cutlass::arch::Sm90, cutlass::arch::OpClassTensorOp, Element, LayoutA, kAlign, Element, LayoutB, kAlign, float,
      Tile, Cluster,
      cutlass::gemm::collective::StageCountAutoCarveout<static_cast<int>(sizeof(typename Epilogue::SharedStorage))>,
      cutlass::gemm::KernelTmaWarpSpecializedPingpong>::CollectiveOp;
  using Kernel = cutlass::gemm::kernel::GemmUniversal<Shape<int, int, int, int>, Mainloop, Epilogue,
                                                      cutlass::gemm::PersistentScheduler>;
  using Adapter = cutlass::gemm::device::GemmUniversalAdapter<Kernel>;
};

// d (M, N) = act(A @ B + bias) for the packed operands a and b of problem (M, N, K).
template <class Element, class LayoutA, class LayoutB>
void run(const at::Tensor& a, const at::Tensor& b, const void* bias, int act, at::Tensor& d, int M, int N, int K) {
  using G = Gemm<Element, LayoutA, LayoutB>;
  using K_ = typename G::Kernel;
  using E = Element;
  auto stride_a = cutlass::make_cute_packed_stride(typename K_::StrideA{}, make_shape(M, K, 1));
  auto stride_b = cutlass::make_cute_packed_stride(typename K_::StrideB{}, make_shape(N, K, 1));
  auto stride_d = cutlass::make_cute_packed_stride(typename K_::StrideD{}, make_shape(M, N, 1));
  typename G::Adapter::Arguments args{
      cutlass::gemm::GemmUniversalMode::kGemm,
      {M, N, K, 1},
      {static_cast<const E*>(a.data_ptr()), stride_a, static_cast<const E*>(b.data_ptr()), stride_b},
      {{}, nullptr, stride_d, static_cast<E*>(d.data_ptr()), stride_d}};
  args.epilogue.thread.alpha = 1.f;
  args.epilogue.thread.beta = 0.f;
  args.epilogue.thread.bias_ptr = static_cast<const E*>(bias);  // null: CUTLASS broadcasts zeros
  args.epilogue.thread.activation.act = act;
  args.hw_info.device_id = a.device().index();
  args.hw_info.sm_count = num_sms(args.hw_info.device_id);

  typename G::Adapter gemm;
  TORCH_CHECK(gemm.can_implement(args) == cutlass::Status::kSuccess, "gemm (sm90): CUTLASS cannot run M=", M,
              " N=", N, " K=", K);
  const size_t ws_bytes = G::Adapter::get_workspace_size(args);
  at::Tensor ws = at::empty({static_cast<int64_t>(ws_bytes)}, a.options().dtype(at::kByte));
  cudaStream_t stream = current_stream(a);
  cutlass::Status st = gemm.initialize(args, ws_bytes ? ws.data_ptr() : nullptr, stream);
  TORCH_CHECK(st == cutlass::Status::kSuccess, "gemm (sm90): initialize failed: ", cutlassGetStatusString(st));
  st = gemm.run(stream);
  TORCH_CHECK(st == cutlass::Status::kSuccess, "gemm (sm90): launch failed: ", cutlassGetStatusString(st));
  CUDA_LAUNCH_CHECK();
}

// Dispatch on a's dtype (bf16 or fp16: the callers checked).
template <class LayoutA, class LayoutB>
void run_typed(const at::Tensor& a, const at::Tensor& b, const void* bias, int act, at::Tensor& d, int M, int N,
               int K) {
  if (a.scalar_type() == at::kBFloat16) {
    run<cutlass::bfloat16_t, LayoutA, LayoutB>(a, b, bias, act, d, M, N, K);
  } else {
    run<cutlass::half_t, LayoutA, LayoutB>(a, b, bias, act, d, M, N, K);
  }
}

}  // namespace sm90
