// y (M, N) = act(x (M, K) @ w (N, K)^T + bias) in fp32 on CPU, for the engine's decode steps.
// There M is the batch of sequences (tens) and the weights come from L3 or DRAM, not L2, so
// BLAS sgemm's repacking of w on every call costs more than the product. Here w
// is streamed once, in place: each register tile is NR rows of w against MR rows of x, with
// dot products along K (w's rows are contiguous), so no packing and no transposes.
// The bias is added as each output is stored and the activation runs vectorised over each row
// segment while it is still in cache.
#include <ATen/Parallel.h>

#include <algorithm>
#include <vector>

#include "ops.h"
#include "panels_cpu.h"
#include "quant_cpu.h"
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
// act 2: GELU tanh form (gelu_tanh8); act 3: ReLU.
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
    return gelu_tanh8(u);
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


// ---- Packed weights: the engine's decode steps (kernels.packed). w is rearranged once into
// panels of PNR rows stored k-major, (ceil(N / PNR), K, PNR), so the kernel is the outer-product
// form: per k one broadcast of x against three vectors of w. No horizontal sums (which the
// dot-product form above needs per output), w is one sequential stream, and bias and activation
// are applied in registers.
template <int mr, int act>
HOT void ptile(const float* x, int64_t K, const float* pw, const f8* b, float* y, int64_t ldy, int nv) {
  f8 acc[mr][3] = {};
  for (int64_t k = 0; k < K; ++k) {
    const f8 w0 = load8(pw + k * PNR), w1 = load8(pw + k * PNR + 8), w2 = load8(pw + k * PNR + 16);
    for (int i = 0; i < mr; ++i) {
      const float v = x[i * K + k];
      const f8 xb = {v, v, v, v, v, v, v, v};  // a broadcast: `f8{} + v` would cost an add
      acc[i][0] += xb * w0;
      acc[i][1] += xb * w1;
      acc[i][2] += xb * w2;
    }
  }
  for (int i = 0; i < mr; ++i) {
    f8 out[3];
    for (int j = 0; j < 3; ++j) {
      out[j] = acc[i][j] + b[j];
      if constexpr (act != 0) out[j] = activate<act>(out[j]);
    }
    if (nv == PNR) {
      for (int j = 0; j < 3; ++j) store8(y + i * ldy + j * 8, out[j]);
    } else {  // the last panel's padding columns are not stored
      std::memcpy(y + i * ldy, out, nv * sizeof(float));
    }
  }
}

template <int act>
HOT void ptile_m(int mr, const float* x, int64_t K, int64_t, const char* w, const f8* b, float* y, int64_t ldy,
                 int nv) {
  const float* pw = reinterpret_cast<const float*>(w);
  switch (mr) {
    case 4: return ptile<4, act>(x, K, pw, b, y, ldy, nv);
    case 3: return ptile<3, act>(x, K, pw, b, y, ldy, nv);
    case 2: return ptile<2, act>(x, K, pw, b, y, ldy, nv);
    default: return ptile<1, act>(x, K, pw, b, y, ldy, nv);
  }
}

// Panels [p0, p1) of y = act(x @ w^T + bias), the activation applied in the tile
template <int act>
HOT void packed_panels(const float* x, const float* pw, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                       int64_t p0, int64_t p1) {
  panel_loop<PNR, 4, f8, ptile_m<act>>(x, reinterpret_cast<const char*>(pw), K * PNR * sizeof(float), bias, y, M, N,
                                       K, 0, p0, p1, 0);
}

// Panels [p0, p1) with the activation as a template argument
HOT void packed_any(const float* x, const float* pw, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                    int64_t p0, int64_t p1, int act) {
  switch (act) {
    case 1: return packed_panels<1>(x, pw, bias, y, M, N, K, p0, p1);
    case 2: return packed_panels<2>(x, pw, bias, y, M, N, K, p0, p1);
    case 3: return packed_panels<3>(x, pw, bias, y, M, N, K, p0, p1);
    default: return packed_panels<0>(x, pw, bias, y, M, N, K, p0, p1);
  }
}

// ---- The packed GEMM on AVX-512: panels of 48 rows (three 16-float vectors) against 8 rows of x,
// 24 accumulators of the 32 registers. Its own functions, each compiled for the target rather
// than templates of the vector type shared with the code above: inlined that way, GCC builds each
// broadcast lane by lane and keeps the accumulators in memory.
#ifdef HAVE_AVX2_CLONES
HOT f16 load16(const float* p) {
  f16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

template <int mr>
AVX512 void ptile16(const float* x, int64_t K, const float* pw, const f16* b, float* y, int64_t ldy, int nv) {
  f16 acc[mr][3] = {};
  for (int64_t k = 0; k < K; ++k) {
    f16 w[3];
    for (int j = 0; j < 3; ++j) w[j] = load16(pw + k * PNR16 + j * 16);
    for (int i = 0; i < mr; ++i) {
      const float v = x[i * K + k];
      const f16 xb = {v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v};
      for (int j = 0; j < 3; ++j) acc[i][j] += xb * w[j];
    }
  }
  for (int i = 0; i < mr; ++i) {
    f16 out[3];
    for (int j = 0; j < 3; ++j) out[j] = acc[i][j] + b[j];
    if (nv == PNR16) std::memcpy(y + i * ldy, out, sizeof(out));
    else std::memcpy(y + i * ldy, out, nv * sizeof(float));  // the last panel's padding is not stored
  }
}

AVX512 void ptile16_m(int mr, const float* x, int64_t K, int64_t, const char* w, const f16* b, float* y,
                      int64_t ldy, int nv) {
  const float* pw = reinterpret_cast<const float*>(w);
  switch (mr) {
    case 8: return ptile16<8>(x, K, pw, b, y, ldy, nv);
    case 7: return ptile16<7>(x, K, pw, b, y, ldy, nv);
    case 6: return ptile16<6>(x, K, pw, b, y, ldy, nv);
    case 5: return ptile16<5>(x, K, pw, b, y, ldy, nv);
    case 4: return ptile16<4>(x, K, pw, b, y, ldy, nv);
    case 3: return ptile16<3>(x, K, pw, b, y, ldy, nv);
    case 2: return ptile16<2>(x, K, pw, b, y, ldy, nv);
    default: return ptile16<1>(x, K, pw, b, y, ldy, nv);
  }
}

// The activation runs over each panel's 128 x 48 block of y just written (in L1/L2), not in the
// tile: in the tile it would multiply the tile's instances (8 row counts x 4 activations) and
// crowd its inner loop.
AVX512 void packed_avx512(const float* x, const float* pw, const float* bias, float* y, int64_t M, int64_t N,
                          int64_t K, int64_t p0, int64_t p1, int act) {
  panel_loop<PNR16, 8, f16, ptile16_m>(x, reinterpret_cast<const char*>(pw), K * PNR16 * sizeof(float), bias, y, M, N,
                                       K, 0, p0, p1, act);
}
#endif

}  // namespace

void linear_cpu_activate(int act, float* y, int64_t ldy, int64_t rows, int64_t n) {
  if (act != 0) best_isa<activate_rows>()(act, y, ldy, rows, n);
}

// x (M, K), w (N, K), bias (N,) or undefined: float32, contiguous, checked by the binding
at::Tensor linear_cpu(const at::Tensor& x, const at::Tensor& w, const c10::optional<at::Tensor>& bias, int64_t act) {
  const int64_t M = x.size(0), K = x.size(1), N = w.size(0);
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const auto cols = best_isa<gemm_cols>();
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

// the panel widths linear_cpu_pack can make here, fastest first; built once, as every linear_packed call asks
const std::vector<int64_t>& linear_cpu_panels() {
  static const std::vector<int64_t> panels = [] {
#ifdef HAVE_AVX2_CLONES
    if (cpu_has_avx512()) return std::vector<int64_t>{PNR16, PNR};
#endif
    return std::vector<int64_t>{PNR};
  }();
  return panels;
}

// w (N, K) float32 contiguous -> (ceil(N / W), K, W), rows past N zero; W one of linear_cpu_panels
at::Tensor linear_cpu_pack(const at::Tensor& w, int64_t W) {
  const int64_t N = w.size(0), K = w.size(1), P = (N + W - 1) / W;
  auto out = at::zeros({P, K, W}, w.options());
  const float* src = w.data_ptr<float>();
  float* dst = out.data_ptr<float>();
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
    for (int64_t p = p0; p < p1; ++p)
      for (int64_t j = 0; j < W && p * W + j < N; ++j)
        for (int64_t k = 0; k < K; ++k) dst[(p * K + k) * W + j] = src[(p * W + j) * K + k];
  });
  return out;
}

// x (M, K), pw from linear_cpu_pack of a (N, K) weight (its width one of linear_cpu_panels), bias
// (N,) or undefined; checked by the binding
at::Tensor linear_cpu_packed(const at::Tensor& x, const at::Tensor& pw, const c10::optional<at::Tensor>& bias,
                             int64_t N, int64_t act) {
  const int64_t M = x.size(0), K = x.size(1), P = pw.size(0), W = pw.size(2);
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  auto fn = best_isa<packed_any>();
#ifdef HAVE_AVX2_CLONES
  if (W == PNR16) fn = packed_avx512;
#endif
  const float *xp = x.data_ptr<float>(), *wp = pw.data_ptr<float>();
  const float* bp = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 65536 / (M * K * W + 1));
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    fn(xp, wp, bp, yp, M, N, K, p0, p1, static_cast<int>(act));
  });
  return y;
}
