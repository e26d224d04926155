// Tensor-core GEMM for bf16/fp16 with fp32 accumulation: y = act(a @ b^T + bias).
// a (M, K) and b (N, K) are both K-contiguous (F.linear's layout), which is exactly what
// mma.sync.m16n8k16.row.col consumes: both operands come out of shared memory through
// ldmatrix without transposes. 128x128x32 block tile, 8 warps of 64x32, a 4-stage cp.async
// pipeline, XOR-swizzled shared memory (conflict-free ldmatrix), bias and activation fused in
// the epilogue (optionally also writing the pre-activation z for the backward).
// Tails: rows/cols beyond M/N and k-chunks beyond K are zero-filled by cp.async (K % 8 == 0).
// On an sm_90 device, when the build has CUTLASS (GPT_ENGINE_CUTLASS) and every leading
// dimension is a multiple of 8, the TMA + wgmma kernels of gemm_sm90_*.cu run instead; this
// kernel stays for other GPUs and odd shapes. The backward GEMMs (dgrad, wgrad) go the same way.
#include <cuda_runtime.h>

#include <type_traits>

#include "act.cuh"
#include "cuda_utils.cuh"
#include "gemm_sm90.h"

namespace {

using OptT = c10::optional<at::Tensor>;

constexpr int BM = 128, BN = 128, BK = 32, STAGES = 4, THREADS = 256;
constexpr int SMEM_BYTES = STAGES * (BM + BN) * BK * 2;  // 64 KiB: needs the opt-in above 48 KiB

// Element offset of 8-element chunk c (0..3) of tile row r. Rows are 64 bytes, so rows r and
// r+2 share banks; XOR-ing the chunk with (r/2)%4 spreads the 8 rows of one ldmatrix phase
// (and of one cp.async phase) over all 8 16-byte bank groups.
__device__ __forceinline__ int swz(int r, int c) { return r * BK + ((c ^ ((r >> 1) & 3)) << 3); }

__device__ __forceinline__ void cp_async16(void* smem, const void* gmem, bool valid) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  const int bytes = valid ? 16 : 0;  // 0: nothing read, the 16 bytes are zero-filled
  asm volatile("cp.async.cg.shared.global [%0], [%1], 16, %2;\n" ::"r"(s), "l"(gmem), "r"(bytes));
}

__device__ __forceinline__ void cp_async_commit() { asm volatile("cp.async.commit_group;\n" ::); }

template <int N>
__device__ __forceinline__ void cp_async_wait() {
  asm volatile("cp.async.wait_group %0;\n" ::"n"(N));
}

__device__ __forceinline__ void ldmatrix_x4(unsigned (&r)[4], const void* smem) {
  const unsigned s = static_cast<unsigned>(__cvta_generic_to_shared(smem));
  asm volatile("ldmatrix.sync.aligned.m8n8.x4.shared.b16 {%0, %1, %2, %3}, [%4];\n"
               : "=r"(r[0]), "=r"(r[1]), "=r"(r[2]), "=r"(r[3])
               : "r"(s));
}

// c += a (16x16, row) * b (16x8, col), fp32 accumulators
template <typename T>
__device__ __forceinline__ void mma16816(float (&c)[4], const unsigned (&a)[4], unsigned b0, unsigned b1) {
  if constexpr (std::is_same<T, at::BFloat16>::value) {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.bf16.bf16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  } else {
    asm volatile(
        "mma.sync.aligned.m16n8k16.row.col.f32.f16.f16.f32 {%0, %1, %2, %3}, {%4, %5, %6, %7}, {%8, %9}, "
        "{%0, %1, %2, %3};\n"
        : "+f"(c[0]), "+f"(c[1]), "+f"(c[2]), "+f"(c[3])
        : "r"(a[0]), "r"(a[1]), "r"(a[2]), "r"(a[3]), "r"(b0), "r"(b1));
  }
}

// Two adjacent outputs (row, col) and (row, col + 1), bounds-checked; one 32-bit store when
// both exist and the pair is 4-byte aligned (N even, col even).
template <typename T>
__device__ __forceinline__ void store_pair(T* p, int row, int col, int N, float v0, float v1) {
  T* q = p + static_cast<int64_t>(row) * N + col;
  if (col + 1 < N && (N & 1) == 0) {
    alignas(4) T pair[2] = {static_cast<T>(v0), static_cast<T>(v1)};
    *reinterpret_cast<unsigned*>(q) = *reinterpret_cast<const unsigned*>(pair);
  } else {
    if (col < N) q[0] = static_cast<T>(v0);
    if (col + 1 < N) q[1] = static_cast<T>(v1);
  }
}

template <typename T, int ACT>
__global__ void __launch_bounds__(THREADS)
gemm_kernel(const T* __restrict__ A, const T* __restrict__ B, const T* __restrict__ bias, T* __restrict__ Y,
            T* __restrict__ Z, int M, int N, int K) {
  extern __shared__ __align__(16) unsigned char smem_raw[];
  T* sA = reinterpret_cast<T*>(smem_raw);  // [STAGES][BM * BK]
  T* sB = sA + STAGES * BM * BK;           // [STAGES][BN * BK]
  const int tid = threadIdx.x, lane = tid & 31, warp = tid >> 5;
  const int wm = warp >> 2, wn = warp & 3;  // 2 x 4 warps, each 64 (M) x 32 (N)
  const int m0 = blockIdx.y * BM, n0 = blockIdx.x * BN;
  const int ktiles = (K + BK - 1) / BK;

  // each thread copies 2 16-byte chunks of A and 2 of B per k-tile: 128 rows x 4 chunks each
  auto load_tile = [&](int stage, int kt) {
#pragma unroll
    for (int i = 0; i < 2; ++i) {
      const int idx = tid + i * THREADS, r = idx >> 2, c = idx & 3;
      const int k = kt * BK + c * 8;
      const bool va = k < K && m0 + r < M, vb = k < K && n0 + r < N;
      cp_async16(sA + stage * BM * BK + swz(r, c), va ? A + static_cast<int64_t>(m0 + r) * K + k : A, va);
      cp_async16(sB + stage * BN * BK + swz(r, c), vb ? B + static_cast<int64_t>(n0 + r) * K + k : B, vb);
    }
  };

  float acc[4][4][4];  // [m16 tile][n8 tile][fragment]
#pragma unroll
  for (int i = 0; i < 4; ++i)
#pragma unroll
    for (int j = 0; j < 4; ++j)
#pragma unroll
      for (int e = 0; e < 4; ++e) acc[i][j][e] = 0.f;

  // one commit group per k-tile (empty groups past the end keep the wait count uniform)
#pragma unroll
  for (int s = 0; s < STAGES - 1; ++s) {
    if (s < ktiles) load_tile(s, s);
    cp_async_commit();
  }

  for (int kt = 0; kt < ktiles; ++kt) {
    cp_async_wait<STAGES - 2>();  // tile kt has landed (this thread's copies)
    __syncthreads();              // ... everyone's, and everyone is done reading tile kt-1's stage
    const int next = kt + STAGES - 1;
    if (next < ktiles) load_tile(next % STAGES, next);  // refills the stage tile kt-1 used
    cp_async_commit();

    const T* tA = sA + (kt % STAGES) * BM * BK;
    const T* tB = sB + (kt % STAGES) * BN * BK;
#pragma unroll
    for (int kk = 0; kk < BK / 16; ++kk) {
      unsigned af[4][4], bf[2][4];
      // A: lanes 0-15 rows 0-15 at k 0-7, lanes 16-31 rows 0-15 at k 8-15 -> a0..a3
#pragma unroll
      for (int i = 0; i < 4; ++i) ldmatrix_x4(af[i], tA + swz(wm * 64 + i * 16 + (lane & 15), kk * 2 + (lane >> 4)));
      // B (n rows, k contiguous): matrices (n 0-7, k 0-7) (n 0-7, k 8-15) (n 8-15, k 0-7) (n 8-15, k 8-15)
      // -> b0, b1 of n8 tile 2j, then b0, b1 of tile 2j+1
#pragma unroll
      for (int j = 0; j < 2; ++j)
        ldmatrix_x4(bf[j], tB + swz(wn * 32 + j * 16 + (lane & 7) + ((lane >> 4) << 3), kk * 2 + ((lane >> 3) & 1)));
#pragma unroll
      for (int i = 0; i < 4; ++i)
#pragma unroll
        for (int j = 0; j < 4; ++j) mma16816<T>(acc[i][j], af[i], bf[j >> 1][(j & 1) * 2], bf[j >> 1][(j & 1) * 2 + 1]);
    }
  }
  cp_async_wait<0>();

  // accumulator fragment: c0, c1 at (row g, cols 2t, 2t+1), c2, c3 at row g + 8
  const int g = lane >> 2, t = lane & 3;
#pragma unroll
  for (int j = 0; j < 4; ++j) {
    const int col = n0 + wn * 32 + j * 8 + 2 * t;
    float b0 = 0.f, b1 = 0.f;
    if (bias != nullptr) {
      if (col < N) b0 = static_cast<float>(bias[col]);
      if (col + 1 < N) b1 = static_cast<float>(bias[col + 1]);
    }
#pragma unroll
    for (int i = 0; i < 4; ++i) {
#pragma unroll
      for (int half = 0; half < 2; ++half) {
        const int row = m0 + wm * 64 + i * 16 + g + half * 8;
        if (row >= M) continue;
        const float v0 = acc[i][j][half * 2] + b0, v1 = acc[i][j][half * 2 + 1] + b1;
        if (Z != nullptr) store_pair(Z, row, col, N, v0, v1);
        store_pair(Y, row, col, N, act_fwd<ACT>(v0), act_fwd<ACT>(v1));
      }
    }
  }
}

template <typename T>
__global__ void act_bwd_kernel(const T* __restrict__ dy, const T* __restrict__ z, T* __restrict__ dz, int64_t n,
                               int act) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    dz[i] = static_cast<T>(static_cast<float>(dy[i]) * act_grad(static_cast<float>(z[i]), act));
}

template <typename T>
__global__ void act_fwd_kernel(const T* __restrict__ z, T* __restrict__ y, int64_t n, int act) {
  for (int64_t i = blockIdx.x * int64_t(blockDim.x) + threadIdx.x; i < n; i += int64_t(gridDim.x) * blockDim.x)
    y[i] = static_cast<T>(act_fwd(static_cast<float>(z[i]), act));
}

template <typename T, int ACT>
void launch_gemm(const T* a, const T* b, const T* bias, T* y, T* z, int M, int N, int K, cudaStream_t stream) {
  auto kern = gemm_kernel<T, ACT>;
  TORCH_CHECK(cudaFuncSetAttribute(kern, cudaFuncAttributeMaxDynamicSharedMemorySize, SMEM_BYTES) == cudaSuccess,
              "gemm: cannot reserve ", SMEM_BYTES, " bytes of shared memory");
  const dim3 grid((N + BN - 1) / BN, (M + BM - 1) / BM);  // x over N: neighbours share the A panel in L2
  kern<<<grid, THREADS, SMEM_BYTES, stream>>>(a, b, bias, y, z, M, N, K);
  CUDA_LAUNCH_CHECK();
}

template <typename T>
void gemm_typed(const at::Tensor& a, const at::Tensor& b, const OptT& bias, int64_t act, at::Tensor& y,
                at::Tensor& z, cudaStream_t stream) {
  const int M = static_cast<int>(a.size(0)), K = static_cast<int>(a.size(1)), N = static_cast<int>(b.size(0));
  const T* bp = bias.has_value() ? bias->data_ptr<T>() : nullptr;
  T* zp = z.defined() ? z.data_ptr<T>() : nullptr;
  const T *ap = a.data_ptr<T>(), *wp = b.data_ptr<T>();
  T* yp = y.data_ptr<T>();
  switch (act) {
    case kGelu: launch_gemm<T, kGelu>(ap, wp, bp, yp, zp, M, N, K, stream); break;
    case kGeluTanh: launch_gemm<T, kGeluTanh>(ap, wp, bp, yp, zp, M, N, K, stream); break;
    case kRelu: launch_gemm<T, kRelu>(ap, wp, bp, yp, zp, M, N, K, stream); break;
    default: launch_gemm<T, kNone>(ap, wp, bp, yp, zp, M, N, K, stream); break;
  }
}

// y = act(z), elementwise (the sm90 path's training forward: z is kept for the backward)
at::Tensor act_fwd_cuda(const at::Tensor& z, int64_t act) {
  auto y = at::empty_like(z);
  const int64_t n = z.numel();
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65536);
  cudaStream_t stream = current_stream(z);
  if (z.scalar_type() == at::kBFloat16) {
    act_fwd_kernel<at::BFloat16><<<blocks, threads, 0, stream>>>(z.data_ptr<at::BFloat16>(), y.data_ptr<at::BFloat16>(),
                                                                 n, static_cast<int>(act));
  } else {
    act_fwd_kernel<at::Half><<<blocks, threads, 0, stream>>>(z.data_ptr<at::Half>(), y.data_ptr<at::Half>(), n,
                                                             static_cast<int>(act));
  }
  CUDA_LAUNCH_CHECK();
  return y;
}

bool aligned16(const at::Tensor& t) { return reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0; }

// Whether the CUTLASS kernels can take a GEMM whose leading dimensions are `dims` on x's device:
// built with them, an sm_90 device (sm_90a code runs on 9.0 only), 16-byte strides and pointers.
bool use_sm90(const at::Tensor& x, std::initializer_list<int64_t> dims, std::initializer_list<const at::Tensor*> ts) {
#ifdef GPT_ENGINE_CUTLASS
  int major = 0, minor = 0;  // cheap driver queries, no cache needed
  cudaDeviceGetAttribute(&major, cudaDevAttrComputeCapabilityMajor, x.device().index());
  cudaDeviceGetAttribute(&minor, cudaDevAttrComputeCapabilityMinor, x.device().index());
  if (major != 9 || minor != 0) return false;
  for (int64_t d : dims)
    if (d % 8) return false;
  for (const at::Tensor* t : ts)
    if (!aligned16(*t)) return false;
  return true;
#else
  (void)x, (void)dims, (void)ts;
  return false;
#endif
}

// The mma.sync kernel's operands: K-contiguous, 16-byte aligned, K zero-padded to a multiple of 8.
at::Tensor operand(const at::Tensor& t) {
  at::Tensor c = t.contiguous();
  if (c.size(1) % 8) c = at::constant_pad_nd(c, {0, 8 - c.size(1) % 8});
  return aligned16(c) ? c : c.clone();
}

}  // namespace

std::vector<at::Tensor> gemm_cuda(const at::Tensor& a, const at::Tensor& b, const OptT& bias, int64_t act,
                                  bool save_preact) {
  const int64_t M = a.size(0), K = a.size(1), N = b.size(0);
  TORCH_CHECK(M < INT32_MAX && N < INT32_MAX && K < INT32_MAX, "gemm: dimensions must fit in int32");
  auto y = at::empty({M, N}, a.options());
  const bool keep_z = save_preact && act != kNone;
  if (M == 0 || N == 0) return {y, keep_z ? at::empty({M, N}, a.options()) : at::Tensor()};
  if (use_sm90(a, {K, N}, {&a, &b}) && (!bias.has_value() || aligned16(*bias))) {
    if (!keep_z) {
      sm90_gemm_fwd(a, b, bias, static_cast<int>(act), y);
      return {y, at::Tensor()};
    }
    sm90_gemm_fwd(a, b, bias, kNone, y);  // y holds z here
    return {act_fwd_cuda(y, act), y};
  }
  TORCH_CHECK((M + BM - 1) / BM <= 65535, "gemm: M too large for the grid");
  at::Tensor z = keep_z ? at::empty({M, N}, a.options()) : at::Tensor();
  cudaStream_t stream = current_stream(a);
  if (a.scalar_type() == at::kBFloat16) {
    gemm_typed<at::BFloat16>(a, b, bias, act, y, z, stream);
  } else {
    TORCH_CHECK(a.scalar_type() == at::kHalf, "gemm: a must be float16 or bfloat16");
    gemm_typed<at::Half>(a, b, bias, act, y, z, stream);
  }
  return {y, z};
}

at::Tensor gemm_dgrad_cuda(const at::Tensor& dz, const at::Tensor& w) {
  const int64_t M = dz.size(0), N = dz.size(1), K = w.size(1);
  if (M == 0 || K == 0 || N == 0) return at::zeros({M, K}, dz.options());
  if (use_sm90(dz, {N, K}, {&dz, &w})) {
    auto d = at::empty({M, K}, dz.options());
    sm90_gemm_dgrad(dz, w, d);
    return d;
  }
  return gemm_cuda(operand(dz), operand(w.t()), OptT(), kNone, false)[0];
}

at::Tensor gemm_wgrad_cuda(const at::Tensor& dz, const at::Tensor& x) {
  const int64_t M = dz.size(0), N = dz.size(1), K = x.size(1);
  if (M == 0 || K == 0 || N == 0) return at::zeros({N, K}, dz.options());
  if (use_sm90(dz, {N, K}, {&dz, &x})) {
    auto d = at::empty({N, K}, dz.options());
    sm90_gemm_wgrad(dz, x, d);
    return d;
  }
  return gemm_cuda(operand(dz.t()), operand(x.t()), OptT(), kNone, false)[0];
}

bool gemm_sm90_taken(const at::Tensor& a, const at::Tensor& b) {
  return use_sm90(a, {a.size(1), b.size(0)}, {&a, &b});
}

at::Tensor act_bwd_cuda(const at::Tensor& dy, const at::Tensor& z, int64_t act) {
  auto dz = at::empty_like(z);
  const int64_t n = z.numel();
  if (n == 0) return dz;
  const int threads = 256;
  const int64_t blocks = std::min<int64_t>((n + threads - 1) / threads, 65536);
  cudaStream_t stream = current_stream(z);
  switch (z.scalar_type()) {
    case at::kFloat:
      act_bwd_kernel<float><<<blocks, threads, 0, stream>>>(dy.data_ptr<float>(), z.data_ptr<float>(),
                                                             dz.data_ptr<float>(), n, static_cast<int>(act));
      break;
    case at::kHalf:
      act_bwd_kernel<at::Half><<<blocks, threads, 0, stream>>>(dy.data_ptr<at::Half>(), z.data_ptr<at::Half>(),
                                                                dz.data_ptr<at::Half>(), n, static_cast<int>(act));
      break;
    default:
      act_bwd_kernel<at::BFloat16><<<blocks, threads, 0, stream>>>(
          dy.data_ptr<at::BFloat16>(), z.data_ptr<at::BFloat16>(), dz.data_ptr<at::BFloat16>(), n,
          static_cast<int>(act));
  }
  CUDA_LAUNCH_CHECK();
  return dz;
}
