// y (M, N) = act(x (M, K) @ w^T + bias) on CPU with w stored packed in bf16 or int8 (quant_cpu.h).
// Weight-only: x stays fp32 and every product is accumulated in fp32. Each weight vector is widened
// in registers (bf16: the 16 bits shifted into an fp32's high half, exact; int8: converted, then
// multiplied by its row's group scale, float(q) * scale as kernels.reference.dequantize_int8), so the
// arithmetic is the fp32 packed GEMM's on the dequantised weight and only the weight stream shrinks
// (2x, ~4x), which is what bounds a decode step. The w8a8 format (below) rounds x to int8 as well,
// by its own reference arithmetic, and so can use AVX-512 VNNI's integer dot products.
#include <ATen/Parallel.h>
#if defined(__x86_64__) || defined(__i386__)
#include <immintrin.h>
#endif

#include <algorithm>

#include "checks.h"
#include "panels_cpu.h"
#include "quant_cpu.h"
#include "simd_cpu.h"

namespace {

enum Fmt { BF16 = 0, INT8 = 1 };

// 8 weights at p (element index) widened to fp32
template <int fmt>
HOT f8 wload8(const void* p) {
  if constexpr (fmt == BF16)
    return load8_bf16(p);
  else
    return load8_i8(p);
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

// Panels [p0, p1) of y for all M rows; panel bytes: pb
template <int fmt>
HOT void qpanels(const float* x, const char* pw, const float* bias, float* y, int64_t M, int64_t N, int64_t K,
                 int64_t G, int64_t pb, int64_t p0, int64_t p1, int act) {
  panel_loop<PNR, 4, f8, qtile_m<fmt>>(x, pw, pb, bias, y, M, N, K, G, p0, p1, act);
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

template <int fmt>
AVX512 inline f16 wload16(const void* p) {
  if constexpr (fmt == BF16) {
    // one vpmovzxwd + vpslld; GCC lowers a 16-lane __builtin_convertvector from uint16 in two halves
    const __m512i b = _mm512_slli_epi32(_mm512_cvtepu16_epi32(_mm256_loadu_si256(static_cast<const __m256i*>(p))), 16);
    f16 v;
    std::memcpy(&v, &b, sizeof(v));
    return v;
  } else {
    // one vpmovsxbd + vcvtdq2ps; GCC lowers __builtin_convertvector(s8x16 -> f16) one lane at a time
    const __m512 v = _mm512_cvtepi32_ps(_mm512_cvtepi8_epi32(_mm_loadu_si128(static_cast<const __m128i*>(p))));
    f16 r;
    std::memcpy(&r, &v, sizeof(r));
    return r;
  }
}

constexpr int64_t PREFETCH = 1024;  // bytes ahead of the weight stream

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
      // the panel's stream a little ahead, every line of it: one core's share of DRAM bandwidth is
      // bound by its misses in flight, which the hardware prefetcher alone keeps too few of here
      const char* ahead = q + k * PNR16 * es + PREFETCH;
      __builtin_prefetch(ahead);
      if constexpr (es == 2) __builtin_prefetch(ahead + 64);
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
  panel_loop<PNR16, 8, f16, qtile16_m<fmt>>(x, pw, pb, bias, y, M, N, K, G, p0, p1, act);
}
#endif

// ---- w8a8: int8 weights against int8 activations (kernels.reference.linear_w8a8). Each row of x is
// quantised per block of 32 inputs (scale max|x| / 127, round half to even) and each block's dot
// product is an exact int32 sum; fp32 takes over from there. The weights are stored as q + 128 (the
// unsigned operand of AVX-512 VNNI's vpdpbusd), four consecutive inputs per column together:
// per panel and group, the W scales (4 W bytes), then G / 4 quads of W x 4 bytes.
constexpr int64_t QB = 32;  // inputs per activation block

// n consecutive blocks of QB values of x (the rows' blocks, row after row): per block qx, its scale
// sx and 128 x sum(qx), which undoes the weights' +128 offset
void quantize_blocks(const float* x, int64_t n, int8_t* qx, float* sx, int32_t* cx) {
  for (int64_t i = 0; i < n; ++i) {
    const float* v = x + i * QB;
    float amax = 0.f;
    for (int64_t k = 0; k < QB; ++k) amax = std::max(amax, std::fabs(v[k]));
    const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    int32_t sum = 0;
    for (int64_t k = 0; k < QB; ++k) {
      const int q = static_cast<int>(std::nearbyint(v[k] * id));  // |v id| <= 127 up to rounding
      qx[i * QB + k] = static_cast<int8_t>(std::clamp(q, -127, 127));
      sum += qx[i * QB + k];
    }
    sx[i] = d;
    cx[i] = 128 * sum;
  }
}

// The plain loop (any panel width, any CPU): the arithmetic of the VNNI kernel, one output at a time.
void w8a8_panels_plain(const int8_t* qx, const float* sx, const int32_t* cx, const uint8_t* pw, float* y,
                       int64_t M, int64_t N, int64_t K, int64_t G, int64_t W, int64_t pb, int64_t p0, int64_t p1) {
  const int64_t nb = K / QB;
  for (int64_t p = p0; p < p1; ++p)
    for (int64_t c = 0; c < std::min(W, N - p * W); ++c)
      for (int64_t i = 0; i < M; ++i) {
        const uint8_t* g = pw + p * pb;
        float out = 0.f;
        for (int64_t g0 = 0; g0 < K; g0 += G, g += (G + 4) * W) {
          float sw;
          std::memcpy(&sw, g + 4 * c, sizeof(sw));
          float a = 0.f;
          for (int64_t b0 = g0; b0 < g0 + G; b0 += QB) {
            int32_t dot = 0;
            for (int64_t k = b0; k < b0 + QB; ++k) dot += qx[i * K + k] * g[4 * W + ((k - g0) / 4 * W + c) * 4 + k % 4];
            a = std::fma(static_cast<float>(dot - cx[i * nb + b0 / QB]), sx[i * nb + b0 / QB], a);
          }
          out = std::fma(a, sw, out);
        }
        y[i * N + p * W + c] = out;
      }
}

#ifdef HAVE_AVX2_CLONES

// quantize_blocks in AVX-512: a block is two registers; vcvtps2dq rounds half to even as nearbyint
// does under the default rounding mode, so the bytes are the plain loop's
VNNI void quantize_blocks_vnni(const float* x, int64_t n, int8_t* qx, float* sx, int32_t* cx) {
  const __m512i lo = _mm512_set1_epi32(-127), hi = _mm512_set1_epi32(127);
  for (int64_t i = 0; i < n; ++i) {
    const __m512 a = _mm512_loadu_ps(x + i * QB), b = _mm512_loadu_ps(x + i * QB + 16);
    const float amax = _mm512_reduce_max_ps(_mm512_max_ps(_mm512_abs_ps(a), _mm512_abs_ps(b)));
    const float d = amax / 127.f, id = d > 0.f ? 1.f / d : 0.f;
    const __m512 s = _mm512_set1_ps(id);
    const __m512i qa = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(a, s)), lo), hi);
    const __m512i qb = _mm512_min_epi32(_mm512_max_epi32(_mm512_cvtps_epi32(_mm512_mul_ps(b, s)), lo), hi);
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qx + i * QB), _mm512_cvtepi32_epi8(qa));
    _mm_storeu_si128(reinterpret_cast<__m128i*>(qx + i * QB + 16), _mm512_cvtepi32_epi8(qb));
    sx[i] = d;
    cx[i] = 128 * _mm512_reduce_add_epi32(_mm512_add_epi32(qa, qb));
  }
}

// An mr x 48 tile: per block 8 vpdpbusd per accumulator, then one fma into the group's sum; group
// sums go into yt through the group's weight scales.
template <int mr>
VNNI void w8a8_tile(const int8_t* qx, const float* sx, const int32_t* cx, int64_t K, int64_t G, const uint8_t* pw,
                    float (*yt)[PNR16]) {
  const int64_t nb = K / QB;
  for (int64_t g0 = 0; g0 < K; g0 += G, pw += (G + 4) * PNR16) {
    const uint8_t* q = pw + 4 * PNR16;
    __m512 a[mr][3];
    for (int i = 0; i < mr; ++i)
      for (int j = 0; j < 3; ++j) a[i][j] = _mm512_setzero_ps();
    for (int64_t b0 = g0; b0 < g0 + G; b0 += QB, q += QB * PNR16) {
      __m512i acc[mr][3];
      for (int i = 0; i < mr; ++i)
        for (int j = 0; j < 3; ++j) acc[i][j] = _mm512_setzero_si512();
      for (int t = 0; t < QB / 4; ++t) {
        __m512i w[3];
        for (int j = 0; j < 3; ++j) w[j] = _mm512_loadu_si512(q + (t * PNR16 + 16 * j) * 4);
        for (int i = 0; i < mr; ++i) {
          int32_t x4;
          std::memcpy(&x4, qx + i * K + b0 + 4 * t, sizeof(x4));
          const __m512i xb = _mm512_set1_epi32(x4);
          for (int j = 0; j < 3; ++j) acc[i][j] = _mm512_dpbusd_epi32(acc[i][j], w[j], xb);
        }
      }
      for (int i = 0; i < mr; ++i) {
        const __m512i corr = _mm512_set1_epi32(cx[i * nb + b0 / QB]);
        const __m512 s = _mm512_set1_ps(sx[i * nb + b0 / QB]);
        for (int j = 0; j < 3; ++j)
          a[i][j] = _mm512_fmadd_ps(_mm512_cvtepi32_ps(_mm512_sub_epi32(acc[i][j], corr)), s, a[i][j]);
      }
    }
    for (int j = 0; j < 3; ++j) {
      const __m512 sw = _mm512_loadu_ps(reinterpret_cast<const float*>(pw) + 16 * j);
      for (int i = 0; i < mr; ++i)
        _mm512_storeu_ps(yt[i] + 16 * j, _mm512_fmadd_ps(a[i][j], sw, _mm512_loadu_ps(yt[i] + 16 * j)));
    }
  }
}

VNNI void w8a8_panels_vnni(const int8_t* qx, const float* sx, const int32_t* cx, const uint8_t* pw, float* y,
                           int64_t M, int64_t N, int64_t K, int64_t G, int64_t pb, int64_t p0, int64_t p1) {
  const int64_t nb = K / QB;
  for (int64_t p = p0; p < p1; ++p) {
    const int nv = static_cast<int>(std::min<int64_t>(PNR16, N - p * PNR16));
    for (int64_t m = 0; m < M; m += 4) {
      const int mr = static_cast<int>(std::min<int64_t>(4, M - m));
      float yt[4][PNR16] = {};
      const int8_t* xq = qx + m * K;
      const float* xs = sx + m * nb;
      const int32_t* xc = cx + m * nb;
      switch (mr) {
        case 4: w8a8_tile<4>(xq, xs, xc, K, G, pw + p * pb, yt); break;
        case 3: w8a8_tile<3>(xq, xs, xc, K, G, pw + p * pb, yt); break;
        case 2: w8a8_tile<2>(xq, xs, xc, K, G, pw + p * pb, yt); break;
        default: w8a8_tile<1>(xq, xs, xc, K, G, pw + p * pb, yt);
      }
      for (int i = 0; i < mr; ++i) std::memcpy(y + (m + i) * N + p * PNR16, yt[i], nv * sizeof(float));
    }
  }
}
#endif

}  // namespace

std::pair<int64_t, int64_t> packed_geometry(const at::Tensor& pw) {
  const auto t = pw.scalar_type();
  if ((t == at::kFloat || t == at::kBFloat16) && pw.dim() == 3) return {pw.size(1), pw.size(2)};
  if ((t == at::kChar || t == at::kByte) && pw.dim() == 4 && pw.size(2) > 4)
    return {pw.size(1) * (pw.size(2) - 4), pw.size(3)};
  return {-1, -1};
}

namespace {
at::Tensor w8a8_packed(const at::Tensor& x, const at::Tensor& pw, const OptT& bias, int64_t N, int64_t act) {
  const int64_t M = x.size(0), K = x.size(1), P = pw.size(0), W = pw.size(3), G = pw.size(2) - 4;
  check_w8a8(K, G);  // x is quantised in blocks of QB inputs
  auto y = at::empty({M, N}, x.options());
  if (M == 0) return y;
  auto qx = at::empty({M, K}, x.options().dtype(at::kChar));
  auto sx = at::empty({M, K / QB}, x.options());
  auto cx = at::empty({M, K / QB}, x.options().dtype(at::kInt));
  const float* xp = x.data_ptr<float>();
  int8_t* qp = qx.data_ptr<int8_t>();
  float* sp = sx.data_ptr<float>();
  int32_t* cp = cx.data_ptr<int32_t>();
  const int64_t nb = K / QB;  // blocks are independent: threads split them as they split the panels
  auto quantize = quantize_blocks;
#ifdef HAVE_AVX2_CLONES
  if (cpu_has_vnni()) quantize = quantize_blocks_vnni;
#endif
  at::parallel_for(0, M * nb, 256, [&](int64_t b0, int64_t b1) {
    quantize(xp + b0 * QB, b1 - b0, qp + b0 * QB, sp + b0, cp + b0);
  });
  const uint8_t* wp = pw.data_ptr<uint8_t>();
  float* yp = y.data_ptr<float>();
  const int64_t pb = pw.numel() / P;
  bool vnni = false;
#ifdef HAVE_AVX2_CLONES
  vnni = W == PNR16 && cpu_has_vnni();
#endif
  at::parallel_for(0, P, 1, [&](int64_t p0, int64_t p1) {
#ifdef HAVE_AVX2_CLONES
    if (vnni) return w8a8_panels_vnni(qp, sp, cp, wp, yp, M, N, K, G, pb, p0, p1);
#endif
    w8a8_panels_plain(qp, sp, cp, wp, yp, M, N, K, G, W, pb, p0, p1);
  });
  if (bias.has_value() && bias->defined()) y.add_(*bias);
  if (act) linear_cpu_activate(static_cast<int>(act), yp, N, M, N);
  return y;
}
}  // namespace

at::Tensor quant_cpu_packed(const at::Tensor& x, const at::Tensor& pw, const OptT& bias, int64_t N, int64_t act) {
  if (pw.scalar_type() == at::kByte) return w8a8_packed(x, pw, bias, N, act);
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

at::Tensor packed_rows_cpu(const at::Tensor& pw, const at::Tensor& ids) {
  const auto [K, W] = packed_geometry(pw);
  const int64_t n = ids.numel();
  auto out = at::empty({n, K}, pw.options().dtype(at::kFloat));
  const int64_t* id = ids.data_ptr<int64_t>();
  float* o = out.data_ptr<float>();
  const auto t = pw.scalar_type();
  const int64_t G = t == at::kChar || t == at::kByte ? pw.size(2) - 4 : K;  // the group length
  const int64_t pb = pw.numel() / pw.size(0) * pw.element_size();         // bytes per panel
  const char* base = static_cast<const char*>(pw.data_ptr());
  for (int64_t r = 0; r < n; ++r) {
    const int64_t p = id[r] / W, c = id[r] % W;
    const char* panel = base + p * pb;
    float* row = o + r * K;
    if (t == at::kFloat) {
      for (int64_t k = 0; k < K; ++k) row[k] = reinterpret_cast<const float*>(panel)[k * W + c];
    } else if (t == at::kBFloat16) {
      for (int64_t k = 0; k < K; ++k) {
        const uint32_t b = static_cast<uint32_t>(reinterpret_cast<const uint16_t*>(panel)[k * W + c]) << 16;
        std::memcpy(row + k, &b, sizeof(float));
      }
    } else {  // int8 k-major, or w8a8's q + 128 in quads of (W, 4); per group: W fp32 scales, then values
      for (int64_t g0 = 0; g0 < K; g0 += G) {
        const char* grp = panel + g0 / G * (G + 4) * W;
        float s;
        std::memcpy(&s, grp + 4 * c, sizeof(s));
        const char* v = grp + 4 * W;
        for (int64_t k = 0; k < G; ++k) {
          const int q = t == at::kChar ? static_cast<int8_t>(v[k * W + c])
                                       : static_cast<int>(static_cast<uint8_t>(v[(k / 4 * W + c) * 4 + k % 4])) - 128;
          row[g0 + k] = static_cast<float>(q) * s;
        }
      }
    }
  }
  return out;
}
