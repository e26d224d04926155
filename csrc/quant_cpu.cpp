// y (M, N) = act(x (M, K) @ w^T + bias) on CPU with w stored packed in bf16 or int8 (quant_cpu.h).
// Weight-only: x stays fp32 and every product is accumulated in fp32. Each weight vector is widened
// in registers (bf16: the 16 bits shifted into an fp32's high half, exact; int8: converted, then
// multiplied by its row's group scale, float(q) * scale as kernels.reference.dequantize_int8), so the
// arithmetic is the fp32 packed GEMM's on the dequantised weight and only the weight stream shrinks
// (2x, ~4x), which is what bounds a decode step. The AVX-512 VNNI / BF16 dot-product instructions
// are not used: they would round x to int8 / bf16, changing the arithmetic the reference defines.
#include <ATen/Parallel.h>

#include <algorithm>

#include "checks.h"
#include "quant_cpu.h"
#include "simd_cpu.h"

namespace {

constexpr int PNR = 24;       // linear_cpu.cpp's panel widths: 3 vectors of 8 (AVX2) or of 16 (AVX-512)
constexpr int64_t PMB = 128;  // rows of x per pass over the panels: a 128 x K block stays in L2
enum Fmt { BF16 = 0, INT8 = 1 };

typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef int8_t s8x8 __attribute__((vector_size(8)));

// 8 weights at p (element index) widened to fp32
template <int fmt>
HOT f8 wload8(const void* p) {
  if constexpr (fmt == BF16) {
    u16x8 h;
    std::memcpy(&h, p, sizeof(h));
    const i8 b = __builtin_convertvector(h, i8) << 16;
    f8 v;
    std::memcpy(&v, &b, sizeof(v));
    return v;
  } else {
    s8x8 q;
    std::memcpy(&q, p, sizeof(q));
    return __builtin_convertvector(q, f8);
  }
}

// One mr x 24 tile over all K. pw: the panel's start; G: the group length (K for bf16, one group).
template <int fmt, int mr>
HOT void qtile(const float* x, int64_t K, int64_t G, const char* pw, const f8* b, float* y, int64_t ldy, int nv) {
  constexpr int64_t es = fmt == BF16 ? 2 : 1;  // bytes per weight
  f8 acc[mr][3] = {};
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    f8 s[3];
    const char* q = pw;
    if constexpr (fmt == INT8) {
      for (int j = 0; j < 3; ++j) s[j] = load8(reinterpret_cast<const float*>(pw) + 8 * j);
      q = pw + 4 * PNR;
      pw += (G + 4) * PNR;
    } else {
      pw += K * PNR * es;
    }
    for (int64_t k = 0; k < G; ++k) {
      f8 w[3];
      for (int j = 0; j < 3; ++j) {
        w[j] = wload8<fmt>(q + (k * PNR + 8 * j) * es);
        if constexpr (fmt == INT8) w[j] *= s[j];
      }
      for (int i = 0; i < mr; ++i) {
        const float v = x[i * K + g0 + k];
        const f8 xb = {v, v, v, v, v, v, v, v};
        for (int j = 0; j < 3; ++j) acc[i][j] += xb * w[j];
      }
    }
  }
  for (int i = 0; i < mr; ++i) {
    f8 out[3];
    for (int j = 0; j < 3; ++j) out[j] = acc[i][j] + b[j];
    std::memcpy(y + i * ldy, out, nv * sizeof(float));  // the last panel's padding columns are not stored
  }
}

template <int fmt>
HOT void qtile_m(int mr, const float* x, int64_t K, int64_t G, const char* pw, const f8* b, float* y, int64_t ldy,
                 int nv) {
  switch (mr) {
    case 4: return qtile<fmt, 4>(x, K, G, pw, b, y, ldy, nv);
    case 3: return qtile<fmt, 3>(x, K, G, pw, b, y, ldy, nv);
    case 2: return qtile<fmt, 2>(x, K, G, pw, b, y, ldy, nv);
    default: return qtile<fmt, 1>(x, K, G, pw, b, y, ldy, nv);
  }
}

// Panels [p0, p1) of y for all M rows; panel bytes: pb. The activation runs on each block of y just written.
template <int fmt>
HOT void qpanels(const float* x, const char* pw, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                 int64_t G, int64_t pb, int64_t p0, int64_t p1, int act) {
  for (int64_t m0 = 0; m0 < M; m0 += PMB) {
    const int64_t m1 = std::min(M, m0 + PMB);
    for (int64_t p = p0; p < p1; ++p) {
      const int nv = static_cast<int>(std::min<int64_t>(PNR, N - p * PNR));
      float bb[PNR] = {};
      if (bias) std::memcpy(bb, bias + p * PNR, nv * sizeof(float));
      const f8 b[3] = {load8(bb), load8(bb + 8), load8(bb + 16)};
      for (int64_t m = m0; m < m1; m += 4)
        qtile_m<fmt>(static_cast<int>(std::min<int64_t>(4, m1 - m)), x + m * K, K, G, pw + p * pb, b,
                     y + m * N + p * PNR, N, nv);
      linear_cpu_activate(act, y + m0 * N + p * PNR, N, m1 - m0, nv);
    }
  }
}

HOT void qpanels_bf16(const float* x, const char* pw, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                      int64_t G, int64_t pb, int64_t p0, int64_t p1, int act) {
  qpanels<BF16>(x, pw, bias, y, M, N, K, G, pb, p0, p1, act);
}

HOT void qpanels_int8(const float* x, const char* pw, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                      int64_t G, int64_t pb, int64_t p0, int64_t p1, int act) {
  qpanels<INT8>(x, pw, bias, y, M, N, K, G, pb, p0, p1, act);
}

// ---- AVX-512: panels of 48 rows (three 16-float vectors) against up to 8 rows of x, as linear_cpu.cpp's
// packed_avx512, in functions compiled for that target.
#ifdef HAVE_AVX2_CLONES
constexpr int PNR16 = 48;
typedef uint16_t u16x16 __attribute__((vector_size(32)));
typedef int32_t i16v __attribute__((vector_size(64)));
typedef int8_t s8x16 __attribute__((vector_size(16)));

template <int fmt>
AVX512 inline f16 wload16(const void* p) {
  if constexpr (fmt == BF16) {
    u16x16 h;
    std::memcpy(&h, p, sizeof(h));
    const i16v b = __builtin_convertvector(h, i16v) << 16;
    f16 v;
    std::memcpy(&v, &b, sizeof(v));
    return v;
  } else {
    s8x16 q;
    std::memcpy(&q, p, sizeof(q));
    return __builtin_convertvector(q, f16);
  }
}

template <int fmt, int mr>
AVX512 void qtile16(const float* x, int64_t K, int64_t G, const char* pw, const f16* b, float* y, int64_t ldy,
                    int nv) {
  constexpr int64_t es = fmt == BF16 ? 2 : 1;
  f16 acc[mr][3] = {};
  for (int64_t g0 = 0; g0 < K; g0 += G) {
    f16 s[3];
    const char* q = pw;
    if constexpr (fmt == INT8) {
      for (int j = 0; j < 3; ++j) std::memcpy(&s[j], pw + 64 * j, sizeof(f16));
      q = pw + 4 * PNR16;
      pw += (G + 4) * PNR16;
    } else {
      pw += K * PNR16 * es;
    }
    for (int64_t k = 0; k < G; ++k) {
      f16 w[3];
      for (int j = 0; j < 3; ++j) {
        w[j] = wload16<fmt>(q + (k * PNR16 + 16 * j) * es);
        if constexpr (fmt == INT8) w[j] *= s[j];
      }
      for (int i = 0; i < mr; ++i) {
        const float v = x[i * K + g0 + k];
        const f16 xb = {v, v, v, v, v, v, v, v, v, v, v, v, v, v, v, v};
        for (int j = 0; j < 3; ++j) acc[i][j] += xb * w[j];
      }
    }
  }
  for (int i = 0; i < mr; ++i) {
    f16 out[3];
    for (int j = 0; j < 3; ++j) out[j] = acc[i][j] + b[j];
    std::memcpy(y + i * ldy, out, nv * sizeof(float));
  }
}

template <int fmt>
AVX512 void qtile16_m(int mr, const float* x, int64_t K, int64_t G, const char* pw, const f16* b, float* y,
                      int64_t ldy, int nv) {
  switch (mr) {
    case 8: return qtile16<fmt, 8>(x, K, G, pw, b, y, ldy, nv);
    case 7: return qtile16<fmt, 7>(x, K, G, pw, b, y, ldy, nv);
    case 6: return qtile16<fmt, 6>(x, K, G, pw, b, y, ldy, nv);
    case 5: return qtile16<fmt, 5>(x, K, G, pw, b, y, ldy, nv);
    case 4: return qtile16<fmt, 4>(x, K, G, pw, b, y, ldy, nv);
    case 3: return qtile16<fmt, 3>(x, K, G, pw, b, y, ldy, nv);
    case 2: return qtile16<fmt, 2>(x, K, G, pw, b, y, ldy, nv);
    default: return qtile16<fmt, 1>(x, K, G, pw, b, y, ldy, nv);
  }
}

template <int fmt>
AVX512 void qpanels16(const float* x, const char* pw, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                      int64_t G, int64_t pb, int64_t p0, int64_t p1, int act) {
  for (int64_t m0 = 0; m0 < M; m0 += PMB) {
    const int64_t m1 = std::min(M, m0 + PMB);
    for (int64_t p = p0; p < p1; ++p) {
      const int nv = static_cast<int>(std::min<int64_t>(PNR16, N - p * PNR16));
      float bb[PNR16] = {};
      if (bias) std::memcpy(bb, bias + p * PNR16, nv * sizeof(float));
      f16 b[3];
      std::memcpy(b, bb, sizeof(b));
      for (int64_t m = m0; m < m1; m += 8)
        qtile16_m<fmt>(static_cast<int>(std::min<int64_t>(8, m1 - m)), x + m * K, K, G, pw + p * pb, b,
                       y + m * N + p * PNR16, N, nv);
      linear_cpu_activate(act, y + m0 * N + p * PNR16, N, m1 - m0, nv);
    }
  }
}
#endif

}  // namespace

std::pair<int64_t, int64_t> packed_geometry(const at::Tensor& pw) {
  const auto t = pw.scalar_type();
  if ((t == at::kFloat || t == at::kBFloat16) && pw.dim() == 3) return {pw.size(1), pw.size(2)};
  if (t == at::kChar && pw.dim() == 4 && pw.size(2) > 4) return {pw.size(1) * (pw.size(2) - 4), pw.size(3)};
  return {-1, -1};
}

at::Tensor quant_cpu_packed(const at::Tensor& x, const at::Tensor& pw, const OptT& bias, int64_t N, int64_t act) {
  const int64_t M = x.size(0), K = x.size(1);
  auto y = at::empty({M, N}, x.options());
  if (M == 0 || N == 0) return y;
  const bool i8w = pw.scalar_type() == at::kChar;
  const int64_t P = pw.size(0), W = i8w ? pw.size(3) : pw.size(2), G = i8w ? pw.size(2) - 4 : K;
  const int64_t pb = pw.numel() / P * pw.element_size();  // bytes per panel
  using Fn = void (*)(const float*, const char*, const float*, float*, int64_t, int64_t, int64_t, int64_t, int64_t,
                      int64_t, int64_t, int);
  Fn fn = i8w ? best_isa<qpanels_int8>() : best_isa<qpanels_bf16>();
#ifdef HAVE_AVX2_CLONES
  if (W == PNR16) fn = i8w ? qpanels16<INT8> : qpanels16<BF16>;
#endif
  const float* xp = x.data_ptr<float>();
  const char* wp = static_cast<const char*>(pw.data_ptr());
  const float* bp = bias.has_value() && bias->defined() ? bias->data_ptr<float>() : nullptr;
  float* yp = y.data_ptr<float>();
  const int64_t grain = std::max<int64_t>(1, 65536 / (M * K * W + 1));
  at::parallel_for(0, P, grain, [&](int64_t p0, int64_t p1) {
    fn(xp, wp, bp, yp, M, N, K, G, pb, p0, p1, static_cast<int>(act));
  });
  return y;
}
