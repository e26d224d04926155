// LayerNorm / RMSNorm forward and backward on CUDA, with the fused residual add.
// Fast path (n % VEC == 0, 16-byte aligned): 128-bit loads, the row held in registers,
// a warp per row for n <= 128*VEC and a block per row above. Anything else takes the
// generic path (scalar loads, re-reads the row from L1/L2). fp32 statistics throughout.
// dweight/dbias: each block writes one fp32 partial row (its warps' sums added in shared memory),
// a second kernel sums the partials per column: deterministic, no atomics.
#include <cuda_runtime.h>

#include "cuda_utils.cuh"

namespace {

using OptT = c10::optional<at::Tensor>;

#define DISPATCH_NORM_TYPES(st, NAME, ...)                                    \
  switch (st) {                                                               \
    case at::kFloat: { using T = float; __VA_ARGS__; break; }                 \
    case at::kHalf: { using T = at::Half; __VA_ARGS__; break; }               \
    case at::kBFloat16: { using T = at::BFloat16; __VA_ARGS__; break; }       \
    default: TORCH_CHECK(false, NAME ": unsupported dtype ", st);             \
  }

__device__ __forceinline__ float warp_sum(float v) {
#pragma unroll
  for (int o = 16; o > 0; o >>= 1) v += __shfl_xor_sync(0xffffffffu, v, o);
  return v;
}

// Sum over the TPR threads (threadIdx.x) sharing a row; TPR > 32 means one row per block,
// so every thread of the block calls this together. smem holds >= 32 floats.
template <int TPR>
__device__ __forceinline__ float row_sum(float v, float* smem) {
  v = warp_sum(v);
  if constexpr (TPR > 32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();  // the previous call's readers are done with smem
    if (lane == 0) smem[warp] = v;
    __syncthreads();
    v = warp_sum(lane < TPR / 32 ? smem[lane] : 0.f);
  }
  return v;
}

// row_sum of two values at once: one round of block syncs instead of two. smem holds >= 64 floats.
template <int TPR>
__device__ __forceinline__ float2 row_sum2(float a, float b, float* smem) {
  a = warp_sum(a);
  b = warp_sum(b);
  if constexpr (TPR > 32) {
    const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
    __syncthreads();
    if (lane == 0) {
      smem[warp] = a;
      smem[32 + warp] = b;
    }
    __syncthreads();
    a = warp_sum(lane < TPR / 32 ? smem[lane] : 0.f);
    b = warp_sum(lane < TPR / 32 ? smem[32 + lane] : 0.f);
  }
  return make_float2(a, b);
}

template <typename T>
__host__ __device__ constexpr int vec_of() { return 16 / static_cast<int>(sizeof(T)); }

template <typename T, int N>
__device__ __forceinline__ void load_vec(const T* p, float (&out)[N]) {
  static_assert(N * sizeof(T) == 16, "one 128-bit access");
  const uint4 raw = *reinterpret_cast<const uint4*>(p);
  const T* e = reinterpret_cast<const T*>(&raw);
#pragma unroll
  for (int k = 0; k < N; ++k) out[k] = static_cast<float>(e[k]);
}

template <typename T, int N>
__device__ __forceinline__ void store_vec(T* p, const float (&in)[N]) {
  uint4 raw;
  T* e = reinterpret_cast<T*>(&raw);
#pragma unroll
  for (int k = 0; k < N; ++k) e[k] = static_cast<T>(in[k]);
  *reinterpret_cast<uint4*>(p) = raw;
}

// Statistics use h = x + residual as stored (rounded to T): the backward recomputes xhat from it.
template <typename T>
__device__ __forceinline__ float round_to(float v) { return static_cast<float>(static_cast<T>(v)); }

// Rows handled by one block: several warps (a row each) for TPR == 32, else one.
template <int TPR>
__host__ __device__ constexpr int rows_per_block() { return TPR >= 128 ? 1 : 128 / TPR; }

// The backward's: 16 warps per block for TPR == 32, so one partial row serves 16 row slots
// (a partial row per warp made its traffic a third of the kernel's at hidden 768).
template <int TPR>
__host__ __device__ constexpr int bwd_rows_per_block() { return TPR >= 128 ? 1 : 512 / TPR; }

// ------------------------------------------------------------------ fast path

template <typename T, int TPR, int ITEMS>
__global__ void __launch_bounds__(TPR * rows_per_block<TPR>())
fwd_fast(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w, const T* __restrict__ b,
         T* __restrict__ y, T* __restrict__ h, float* __restrict__ mean, float* __restrict__ rstd, int rows, int n,
         float eps, bool rms) {
  constexpr int VEC = vec_of<T>();
  __shared__ float smem[32];
  const int row = blockIdx.x * rows_per_block<TPR>() + threadIdx.y;
  if (row >= rows) return;  // only when TPR == 32 (no block-wide sync there)
  const int64_t off = static_cast<int64_t>(row) * n;
  float v[ITEMS][VEC];
  float s = 0.f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * TPR + threadIdx.x) * VEC;
    if (col < n) {
      load_vec(x + off + col, v[it]);
      if (res) {
        float r[VEC];
        load_vec(res + off + col, r);
#pragma unroll
        for (int k = 0; k < VEC; ++k) v[it][k] = round_to<T>(v[it][k] + r[k]);
        store_vec(h + off + col, v[it]);
      }
#pragma unroll
      for (int k = 0; k < VEC; ++k) s += v[it][k];
    }
  }
  const float mu = rms ? 0.f : row_sum<TPR>(s, smem) / n;
  float ss = 0.f;
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    if ((it * TPR + threadIdx.x) * VEC < n) {
#pragma unroll
      for (int k = 0; k < VEC; ++k) ss += (v[it][k] - mu) * (v[it][k] - mu);
    }
  }
  const float rs = rsqrtf(row_sum<TPR>(ss, smem) / n + eps);
#pragma unroll
  for (int it = 0; it < ITEMS; ++it) {
    const int col = (it * TPR + threadIdx.x) * VEC;
    if (col < n) {
      float wv[VEC], bv[VEC], o[VEC];
      load_vec(w + col, wv);
      if (b) load_vec(b + col, bv);
#pragma unroll
      for (int k = 0; k < VEC; ++k) o[k] = (v[it][k] - mu) * rs * wv[k] + (b ? bv[k] : 0.f);
      store_vec(y + off + col, o);
    }
  }
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// Grid-stride over rows; row slot (blockIdx.x, threadIdx.y) accumulates dweight/dbias partials in
// registers; at the end the block's slots are summed in shared memory into pw/pb[blockIdx.x].
// Each row is read twice: pass 1 for the row sums and the partials, pass 2 (an L1/L2 hit) for dx.
// Holding the row instead cost registers the accumulators need: at hidden 12288-16384 (1024
// threads, 64 registers each) it spilled, and occupancy fell everywhere.
template <typename T, int TPR, int ITEMS>
__global__ void __launch_bounds__(TPR * bwd_rows_per_block<TPR>())
bwd_fast(const T* __restrict__ dy, const T* __restrict__ hin, const T* __restrict__ dh, const T* __restrict__ w,
         const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx, float* __restrict__ pw,
         float* __restrict__ pb, int rows, int n, bool rms) {
  constexpr int VEC = vec_of<T>(), R = bwd_rows_per_block<TPR>();
  __shared__ float smem[64];
  extern __shared__ float part[];  // R > 1: [2][n], the block's dweight and dbias partials
  float aw[ITEMS][VEC], ab[ITEMS][VEC];
#pragma unroll
  for (int it = 0; it < ITEMS; ++it)
#pragma unroll
    for (int k = 0; k < VEC; ++k) aw[it][k] = ab[it][k] = 0.f;
  const int slot = blockIdx.x * R + threadIdx.y;
  const int stride = gridDim.x * R;
  // for TPR > 32 slot == blockIdx.x: the whole block runs the same iterations (row_sum2 syncs)
  for (int row = slot; row < rows; row += stride) {
    const int64_t off = static_cast<int64_t>(row) * n;
    const float mu = rms ? 0.f : mean[row], rs = rstd[row];
    float s1 = 0.f, s2 = 0.f;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int col = (it * TPR + threadIdx.x) * VEC;
      if (col < n) {
        float hv[VEC], g[VEC], wv[VEC];
        load_vec(hin + off + col, hv);
        load_vec(dy + off + col, g);
        load_vec(w + col, wv);
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          const float xh = (hv[k] - mu) * rs, gw = g[k] * wv[k];
          s1 += gw;
          s2 += gw * xh;
          aw[it][k] += g[k] * xh;
          ab[it][k] += g[k];
        }
      }
    }
    const float2 m = row_sum2<TPR>(s1, s2, smem);
    const float m1 = rms ? 0.f : m.x / n, m2 = m.y / n;
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int col = (it * TPR + threadIdx.x) * VEC;
      if (col < n) {
        float hv[VEC], g[VEC], wv[VEC], d[VEC], o[VEC];
        load_vec(hin + off + col, hv);
        load_vec(dy + off + col, g);
        load_vec(w + col, wv);
        if (dh) load_vec(dh + off + col, d);
#pragma unroll
        for (int k = 0; k < VEC; ++k)
          o[k] = rs * (g[k] * wv[k] - m1 - (hv[k] - mu) * rs * m2) + (dh ? d[k] : 0.f);
        store_vec(dx + off + col, o);
      }
    }
  }
  const int64_t poff = static_cast<int64_t>(blockIdx.x) * n;
  if constexpr (R == 1) {
#pragma unroll
    for (int it = 0; it < ITEMS; ++it) {
      const int col = (it * TPR + threadIdx.x) * VEC;
      if (col < n) {
#pragma unroll
        for (int k = 0; k < VEC; ++k) {
          pw[poff + col + k] = aw[it][k];
          pb[poff + col + k] = ab[it][k];
        }
      }
    }
  } else {
    // the warps add their partials in turn (every warp owns the same columns): deterministic
    for (int y = 0; y < R; ++y) {
      if (threadIdx.y == y) {
#pragma unroll
        for (int it = 0; it < ITEMS; ++it) {
          const int col = (it * TPR + threadIdx.x) * VEC;
          if (col < n) {
#pragma unroll
            for (int k = 0; k < VEC; ++k) {
              part[col + k] = (y ? part[col + k] : 0.f) + aw[it][k];
              part[n + col + k] = (y ? part[n + col + k] : 0.f) + ab[it][k];
            }
          }
        }
      }
      __syncthreads();
    }
    for (int i = threadIdx.y * TPR + threadIdx.x; i < n; i += R * TPR) {
      pw[poff + i] = part[i];
      pb[poff + i] = part[n + i];
    }
  }
}

// ------------------------------------------------------------------ generic path

constexpr int kGenericThreads = 256;

template <typename T>
__global__ void __launch_bounds__(kGenericThreads)
fwd_generic(const T* __restrict__ x, const T* __restrict__ res, const T* __restrict__ w, const T* __restrict__ b,
            T* __restrict__ y, T* __restrict__ h, float* __restrict__ mean, float* __restrict__ rstd, int n,
            float eps, bool rms) {
  __shared__ float smem[32];
  const int row = blockIdx.x;
  const int64_t off = static_cast<int64_t>(row) * n;
    auto hv = [&](int i) {
    return res ? round_to<T>(static_cast<float>(x[off + i]) + static_cast<float>(res[off + i]))
               : static_cast<float>(x[off + i]);
  };
  float s = 0.f;
  for (int i = threadIdx.x; i < n; i += kGenericThreads) {
    const float v = hv(i);
    if (res) h[off + i] = static_cast<T>(v);
    s += v;
  }
  const float mu = rms ? 0.f : row_sum<kGenericThreads>(s, smem) / n;
  float ss = 0.f;
  for (int i = threadIdx.x; i < n; i += kGenericThreads) {
    const float d = hv(i) - mu;
    ss += d * d;
  }
  const float rs = rsqrtf(row_sum<kGenericThreads>(ss, smem) / n + eps);
  for (int i = threadIdx.x; i < n; i += kGenericThreads) {
    const float o = (hv(i) - mu) * rs * static_cast<float>(w[i]) + (b ? static_cast<float>(b[i]) : 0.f);
    y[off + i] = static_cast<T>(o);
  }
  if (threadIdx.x == 0) {
    mean[row] = mu;
    rstd[row] = rs;
  }
}

// Block b owns partial row b of pw/pb (zero-initialised); column i is always touched by the
// same thread, so the read-modify-write needs no atomics.
template <typename T>
__global__ void __launch_bounds__(kGenericThreads)
bwd_generic(const T* __restrict__ dy, const T* __restrict__ hin, const T* __restrict__ dh, const T* __restrict__ w,
            const float* __restrict__ mean, const float* __restrict__ rstd, T* __restrict__ dx,
            float* __restrict__ pw, float* __restrict__ pb, int rows, int n, bool rms) {
  __shared__ float smem[64];
  const int64_t poff = static_cast<int64_t>(blockIdx.x) * n;
  for (int row = blockIdx.x; row < rows; row += gridDim.x) {
    const int64_t off = static_cast<int64_t>(row) * n;
    const float mu = rms ? 0.f : mean[row], rs = rstd[row];
    float s1 = 0.f, s2 = 0.f;
    for (int i = threadIdx.x; i < n; i += kGenericThreads) {
      const float xh = (static_cast<float>(hin[off + i]) - mu) * rs, g = static_cast<float>(dy[off + i]);
      const float gw = g * static_cast<float>(w[i]);
      s1 += gw;
      s2 += gw * xh;
      pw[poff + i] += g * xh;
      pb[poff + i] += g;
    }
    const float2 m = row_sum2<kGenericThreads>(s1, s2, smem);
    const float m1 = rms ? 0.f : m.x / n, m2 = m.y / n;
    for (int i = threadIdx.x; i < n; i += kGenericThreads) {
      const float xh = (static_cast<float>(hin[off + i]) - mu) * rs, g = static_cast<float>(dy[off + i]);
      const float o = rs * (g * static_cast<float>(w[i]) - m1 - xh * m2) + (dh ? static_cast<float>(dh[off + i]) : 0.f);
      dx[off + i] = static_cast<T>(o);
    }
  }
}

// dw[c] = sum_p pw[p, c] (and db): block (32, 16), a column per threadIdx.x, coalesced rows.
template <typename T>
__global__ void __launch_bounds__(512)
sum_partials(const float* __restrict__ pw, const float* __restrict__ pb, T* __restrict__ dw, T* __restrict__ db,
             int parts, int n) {
  __shared__ float sw[16][33], sb[16][33];
  const int col = blockIdx.x * 32 + threadIdx.x;
  float a = 0.f, c = 0.f;
  if (col < n) {
    for (int p = threadIdx.y; p < parts; p += 16) {
      a += pw[static_cast<int64_t>(p) * n + col];
      c += pb[static_cast<int64_t>(p) * n + col];
    }
  }
  sw[threadIdx.y][threadIdx.x] = a;
  sb[threadIdx.y][threadIdx.x] = c;
  __syncthreads();
  if (threadIdx.y == 0 && col < n) {
    for (int p = 1; p < 16; ++p) {
      a += sw[p][threadIdx.x];
      c += sb[p][threadIdx.x];
    }
    dw[col] = static_cast<T>(a);
    if (db) db[col] = static_cast<T>(c);
  }
}

// ------------------------------------------------------------------ launch

bool aligned16(const void* p) { return reinterpret_cast<uintptr_t>(p) % 16 == 0; }

// Fast-path configuration index for n elements of VEC-wide vectors, -1 for the generic path.
// (TPR, ITEMS): (32,1) (32,2) (32,4) (128,2) (256,2) (512,2) (512,3) (512,4) (1024,4).
// 1536 and 2048 vectors (bf16 hidden 12288, 16384) take 512 threads: at 1024 a quarter of
// 12288's threads would idle in the second item and the backward would be capped at 64 registers.
int pick_config(int n, int vec) {
  static constexpr int cap[] = {32, 64, 128, 256, 512, 1024, 1536, 2048, 4096};  // vectors per row
  if (n % vec != 0) return -1;
  for (int i = 0; i < 9; ++i)
    if (n / vec <= cap[i]) return i;
  return -1;
}

#define NORM_CONFIG_SWITCH(cfg, LAUNCH)  \
  switch (cfg) {                         \
    case 0: LAUNCH(32, 1); break;        \
    case 1: LAUNCH(32, 2); break;        \
    case 2: LAUNCH(32, 4); break;        \
    case 3: LAUNCH(128, 2); break;       \
    case 4: LAUNCH(256, 2); break;       \
    case 5: LAUNCH(512, 2); break;       \
    case 6: LAUNCH(512, 3); break;       \
    case 7: LAUNCH(512, 4); break;       \
    default: LAUNCH(1024, 4); break;     \
  }

template <typename T>
const T* ptr(const OptT& t) { return t.has_value() ? t->data_ptr<T>() : nullptr; }

#define LAUNCH_FWD(TPR, ITEMS)                                                                   \
  {                                                                                              \
    constexpr int R = rows_per_block<TPR>();                                                     \
    fwd_fast<T, TPR, ITEMS><<<(rows + R - 1) / R, dim3(TPR, R), 0, stream>>>(x, res, w, b, y, h, mean, rstd, \
                                                                           rows, n, eps, rms);    \
  }

template <typename T>
void launch_fwd(const T* x, const T* res, const T* w, const T* b, T* y, T* h, float* mean, float* rstd, int rows,
                int n, float eps, bool rms, cudaStream_t stream) {
  const bool ok = aligned16(x) && aligned16(w) && aligned16(y) && (!res || (aligned16(res) && aligned16(h))) &&
                  (!b || aligned16(b));
  const int cfg = ok ? pick_config(n, vec_of<T>()) : -1;
  if (cfg < 0) {
    fwd_generic<T><<<rows, kGenericThreads, 0, stream>>>(x, res, w, b, y, h, mean, rstd, n, eps, rms);
  } else {
    NORM_CONFIG_SWITCH(cfg, LAUNCH_FWD)
  }
  CUDA_LAUNCH_CHECK();
}
#undef LAUNCH_FWD

// as many resident blocks as fit: few partial rows (one per block), each slot sees many rows
#define LAUNCH_BWD(TPR, ITEMS)                                                                        \
  {                                                                                                   \
    constexpr int R = bwd_rows_per_block<TPR>();                                                      \
    auto kern = bwd_fast<T, TPR, ITEMS>;                                                              \
    const size_t smem = R > 1 ? 2 * static_cast<size_t>(n) * sizeof(float) : 0;                       \
    int per_sm = 0;                                                                                   \
    cudaOccupancyMaxActiveBlocksPerMultiprocessor(&per_sm, kern, TPR * R, smem);                      \
    const int64_t grid = std::max<int64_t>(1, std::min<int64_t>((rows + R - 1) / R,                   \
                                                                int64_t(sms) * std::max(per_sm, 1))); \
    partial = at::empty({2, grid, n}, opts);                                                          \
    kern<<<static_cast<int>(grid), dim3(TPR, R), smem, stream>>>(dy, h, dh, w, mean, rstd, dx,        \
                                                                partial[0].data_ptr<float>(),         \
                                                                partial[1].data_ptr<float>(), rows, n, rms); \
  }

// -> the fp32 partials (2, parts, n): [0] dweight, [1] dbias
template <typename T>
at::Tensor launch_bwd(const T* dy, const T* h, const T* dh, const T* w, const float* mean, const float* rstd, T* dx,
                      int rows, int n, bool rms, int sms, const at::TensorOptions& opts, cudaStream_t stream) {
  const bool ok = aligned16(dy) && aligned16(h) && aligned16(w) && aligned16(dx) && (!dh || aligned16(dh));
  const int cfg = ok ? pick_config(n, vec_of<T>()) : -1;
  at::Tensor partial;
  if (cfg < 0) {
    const int grid = std::max(1, std::min(rows, 2 * sms));
    partial = at::zeros({2, grid, n}, opts);
    bwd_generic<T><<<grid, kGenericThreads, 0, stream>>>(dy, h, dh, w, mean, rstd, dx, partial[0].data_ptr<float>(),
                                                         partial[1].data_ptr<float>(), rows, n, rms);
  } else {
    NORM_CONFIG_SWITCH(cfg, LAUNCH_BWD)
  }
  CUDA_LAUNCH_CHECK();
  return partial;
}
#undef LAUNCH_BWD

}  // namespace

std::vector<at::Tensor> norm_fwd_cuda(const at::Tensor& x, const OptT& residual, const at::Tensor& w, const OptT& b,
                                      double eps, bool rms) {
  TORCH_CHECK(x.size(0) < INT32_MAX && x.size(1) < INT32_MAX, "norm: too many rows or columns");
  const int rows = static_cast<int>(x.size(0)), n = static_cast<int>(x.size(1));
  auto y = at::empty_like(x);
  at::Tensor h = residual.has_value() ? at::empty_like(x) : at::Tensor();
  auto mean = at::empty({rows}, x.options().dtype(at::kFloat)), rstd = at::empty_like(mean);
  if (rows == 0) return {y, h, mean, rstd};
  DISPATCH_NORM_TYPES(x.scalar_type(), "norm_fwd_cuda",
                      launch_fwd<T>(x.data_ptr<T>(), ptr<T>(residual), w.data_ptr<T>(), ptr<T>(b), y.data_ptr<T>(),
                                    h.defined() ? h.data_ptr<T>() : nullptr, mean.data_ptr<float>(),
                                    rstd.data_ptr<float>(), rows, n, static_cast<float>(eps), rms, current_stream(x)))
  return {y, h, mean, rstd};
}

std::vector<at::Tensor> norm_bwd_cuda(const at::Tensor& dy, const at::Tensor& h, const OptT& dh, const at::Tensor& w,
                                      const at::Tensor& mean, const at::Tensor& rstd, bool has_bias, bool rms) {
  TORCH_CHECK(h.size(0) < INT32_MAX && h.size(1) < INT32_MAX, "norm: too many rows or columns");
  const int rows = static_cast<int>(h.size(0)), n = static_cast<int>(h.size(1));
  auto dx = at::empty_like(h), dw = at::empty_like(w);
  at::Tensor db = has_bias ? at::empty_like(w) : at::Tensor();
  cudaStream_t stream = current_stream(h);
  const int sms = num_sms(h.device().index());
  const auto opts = h.options().dtype(at::kFloat);
  DISPATCH_NORM_TYPES(h.scalar_type(), "norm_bwd_cuda", {
    at::Tensor partial = launch_bwd<T>(dy.data_ptr<T>(), h.data_ptr<T>(), ptr<T>(dh), w.data_ptr<T>(),
                                       mean.data_ptr<float>(), rstd.data_ptr<float>(), dx.data_ptr<T>(), rows, n,
                                       rms, sms, opts, stream);
    const int parts = static_cast<int>(partial.size(1));
    sum_partials<T><<<(n + 31) / 32, dim3(32, 16), 0, stream>>>(partial[0].data_ptr<float>(),
                                                               partial[1].data_ptr<float>(), dw.data_ptr<T>(),
                                                               has_bias ? db.data_ptr<T>() : nullptr, parts, n);
    CUDA_LAUNCH_CHECK();
  })
  return {dx, dw, db};
}
