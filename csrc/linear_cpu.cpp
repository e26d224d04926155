// y (M, N) = act(x (M, K) @ w (N, K)^T + bias) in fp32 on CPU, for the engine's decode steps.
// There M is the batch of sequences (tens) and the weights come from L3 or DRAM, not L2: BLAS
// sgemm repacks w on every call and ran at ~60 GFLOP/s on 2 Zen 3 cores cycling through GPT-2
// layers (this kernel: ~110, 1.3-3.5x for 128-8 rows, benchmarks/test_bench_linear.py). Here w
// is streamed once, in place: each register tile is NR rows of w against MR rows of x, with
// dot products along K (w's rows are contiguous), so no packing and no transposes.
// The bias is added as each output is stored and the activation runs vectorised over each row
// segment while it is still in cache.
#include <ATen/Parallel.h>

#include <algorithm>

#include "checks.h"
#include "simd_cpu.h"

namespace {

constexpr int MR = 4, NR = 3;  // 12 accumulators + 3 w vectors + 1 x vector: the 16 AVX registers
constexpr int64_t MB = 64;     // rows of x per pass over w: a 64 x K block of x stays in L2

// y[i, j] = x[i, :K8] . w[j, :K8] (+ bias[j]) for an mr x nr tile; K8 = K rounded down to 8
template <int mr, int nr>
HOT void tile(const float* x, int64_t K, const float* w, const float* bias, float* y, int64_t ldy) {
  f8 acc[mr][nr] = {};
  for (int64_t k = 0; k + 8 <= K; k += 8) {
    f8 wv[nr];
    for (int j = 0; j < nr; ++j) wv[j] = load8(w + j * K + k);
    for (int i = 0; i < mr; ++i) {
      const f8 xv = load8(x + i * K + k);
      for (int j = 0; j < nr; ++j) acc[i][j] += xv * wv[j];
    }
  }
  for (int j = 0; j < nr; ++j) {
    float s[4];
    if constexpr (mr == 4) {
      const f4 v = hsum4(acc[0][j], acc[1][j], acc[2][j], acc[3][j]);
      std::memcpy(s, &v, sizeof(v));
    } else {
      for (int i = 0; i < mr; ++i) s[i] = hsum(acc[i][j]);
    }
    for (int i = 0; i < mr; ++i) y[i * ldy + j] = bias ? s[i] + bias[j] : s[i];
  }
}

// The (mr, nr) edge tiles dispatch to their own unrolled copies.
template <int nr>
HOT void tile_m(int mr, const float* x, int64_t K, const float* w, const float* b, float* y, int64_t ldy) {
  switch (mr) {
    case 4: return tile<4, nr>(x, K, w, b, y, ldy);
    case 3: return tile<3, nr>(x, K, w, b, y, ldy);
    case 2: return tile<2, nr>(x, K, w, b, y, ldy);
    default: return tile<1, nr>(x, K, w, b, y, ldy);
  }
}

HOT void tile_mn(int mr, int nr, const float* x, int64_t K, const float* w, const float* b, float* y, int64_t ldy) {
  switch (nr) {
    case 3: return tile_m<3>(mr, x, K, w, b, y, ldy);
    case 2: return tile_m<2>(mr, x, K, w, b, y, ldy);
    default: return tile_m<1>(mr, x, K, w, b, y, ldy);
  }
}

// act 1: GELU, 0.5 u (1 + erf(u / sqrt 2)), erf by Abramowitz & Stegun 7.1.26 (|error| < 1.5e-7);
// act 2: GELU tanh form, 0.5 u (1 + tanh z) = u / (1 + e^(-2z)); act 3: ReLU.
template <int act>
HOT f8 activate(f8 u) {
  if constexpr (act == 1) {
    const f8 a = u * 0.70710678f, x = a < 0.f ? -a : a;
    const f8 t = 1.f / (1.f + 0.3275911f * x);
    f8 p = 1.061405429f * t - 1.453152027f;
    p = p * t + 1.421413741f;
    p = p * t - 0.284496736f;
    p = p * t + 0.254829592f;
    f8 e = 1.f - p * t * exp8(-x * x);
    e = a < 0.f ? -e : e;
    return 0.5f * u * (1.f + e);
  } else if constexpr (act == 2) {
    const f8 z = 0.7978845608f * (u + 0.044715f * u * u * u);
    return u / (1.f + exp8(-2.f * z));
  } else {
    return u < 0.f ? f8{} : u;
  }
}

template <int act>
HOT void activate_row(float* y, int64_t n) {
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) store8(y + i, activate<act>(load8(y + i)));
  if (i < n) {  // the tail through the same vector code, so every element gets the same numerics
    float buf[8] = {};
    std::copy(y + i, y + n, buf);
    store8(buf, activate<act>(load8(buf)));
    std::copy(buf, buf + (n - i), y + i);
  }
}

HOT void activate_rows(int act, float* y, int64_t ldy, int64_t rows, int64_t n) {
  for (int64_t r = 0; r < rows; ++r) {
    float* row = y + r * ldy;
    switch (act) {
      case 1: activate_row<1>(row, n); break;
      case 2: activate_row<2>(row, n); break;
      case 3: activate_row<3>(row, n); break;
      default: break;
    }
  }
}

// Rows [0, M) of y, columns [n0, n1).
HOT void gemm_cols(const float* x, const float* w, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                   int64_t n0, int64_t n1, int act) {
  const int64_t K8 = K & ~int64_t{7};
  for (int64_t m0 = 0; m0 < M; m0 += MB) {
    const int64_t m1 = std::min(M, m0 + MB);
    for (int64_t n = n0; n < n1; n += NR) {
      const int nr = static_cast<int>(std::min<int64_t>(NR, n1 - n));
      // the next panel of w while this one runs against every row tile: the hardware prefetcher
      // ramps up too slowly on the panel's short row streams when w comes from L3
      if (n + NR < n1)
        for (int64_t i = 0, e = std::min<int64_t>(NR, n1 - n - NR) * K; i < e; i += 16)
          __builtin_prefetch(w + (n + NR) * K + i);
      for (int64_t m = m0; m < m1; m += MR)
        tile_mn(static_cast<int>(std::min<int64_t>(MR, m1 - m)), nr, x + m * K, K, w + n * K,
                bias ? bias + n : nullptr, y + m * N + n, N);
    }
    if (K8 < K)  // the last K % 8 terms, kept out of the tiles so their loops stay lean
      for (int64_t m = m0; m < m1; ++m)
        for (int64_t n = n0; n < n1; ++n) {
          float s = 0.f;
          for (int64_t t = K8; t < K; ++t) s += x[m * K + t] * w[n * K + t];
          y[m * N + n] += s;
        }
    activate_rows(act, y + m0 * N + n0, N, m1 - m0, n1 - n0);
  }
}

#define COLS_ARGS \
  const float *x, const float *w, const float *bias, float *y, int64_t M, int64_t N, int64_t K, int64_t n0, int64_t n1, int act
#define COLS_CALL gemm_cols(x, w, bias, y, M, N, K, n0, n1, act)

void cols_generic(COLS_ARGS) { COLS_CALL; }
#ifdef HAVE_AVX2_CLONES
AVX2 void cols_avx2(COLS_ARGS) { COLS_CALL; }
#endif

}  // namespace

// x (M, K), w (N, K), bias (N,) or undefined: float32, contiguous, checked by the binding
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, int64_t act) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  auto cols = cols_generic;
#ifdef HAVE_AVX2_CLONES
  if (cpu_has_avx2()) cols = cols_avx2;
#endif
  const float *xp = x.data_ptr<float>(), *wp = w.data_ptr<float>();
  const float* bp = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  // threads split w's rows in whole tiles; a chunk is worth a thread from ~64k multiply-adds
  const int64_t panels = (N + NR - 1) / NR, grain = std::max<int64_t>(1, 65536 / (M * K * NR + 1));
  at::parallel_for(0, panels, grain, [&](int64_t p0, int64_t p1) {
    cols(xp, wp, bp, yp, M, N, K, p0 * NR, std::min(N, p1 * NR), static_cast<int>(act));
  });
  return y;
}
