// LayerNorm / RMSNorm forward and backward on CPU, with the fused residual add.
// Rows are independent: at::parallel_for over rows, each row staged once in an fp32 buffer
// so the inner loops are plain float loops the compiler vectorises. Statistics in fp32.
// The row loops run as the widest ISA copy this CPU has (best_isa, simd_cpu.h).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <vector>

#include "ops.h"
#include "simd_cpu.h"

namespace {

// 8 independent partial sums: vectorisable without -ffast-math and more accurate than one.
HOT float sum8(const float* a, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j];
  for (; i < n; ++i) acc[i & 7] += a[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

HOT float dot8(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) acc[i & 7] += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

template <typename T>
HOT void to_float(const T* src, float* dst, int64_t n) {
  for (int64_t i = 0; i < n; ++i) dst[i] = static_cast<float>(src[i]);
}

// rows [r0, r1): y = norm(x (+ res)), h = x + res when res is given; buf, tmp: n floats each
template <typename T>
HOT void fwd_rows(const T* x, const T* res, const float* wf, const float* bf, T* y, T* h, float* mean, float* rstd,
                  int64_t r0, int64_t r1, int64_t n, float eps, bool rms, float* buf, float* tmp) {
  for (int64_t r = r0; r < r1; ++r) {
    to_float(x + r * n, buf, n);
    if (res) {
      const T* rr = res + r * n;
      // statistics of h as stored (rounded): the backward recomputes xhat from that h
      for (int64_t i = 0; i < n; ++i) h[r * n + i] = static_cast<T>(buf[i] + static_cast<float>(rr[i]));
      to_float(h + r * n, buf, n);
    }
    float mu = 0.f;
    if (!rms) {
      // centred (two-pass variance, no cancellation) about the row's first value first: a constant
      // row then centres to exact zeros, not to the rounding of sum / n, which rstd ~ 1 / sqrt(eps)
      // would blow up
      const float x0 = buf[0];
      for (int64_t i = 0; i < n; ++i) buf[i] -= x0;
      const float d = sum8(buf, n) / n;
      for (int64_t i = 0; i < n; ++i) buf[i] -= d;
      mu = x0 + d;
    }
    const float rs = 1.0f / std::sqrt(dot8(buf, buf, n) / n + eps);
    for (int64_t i = 0; i < n; ++i) tmp[i] = buf[i] * rs * wf[i] + bf[i];
    T* yr = y + r * n;
    for (int64_t i = 0; i < n; ++i) yr[i] = static_cast<T>(tmp[i]);
    mean[r] = mu;
    rstd[r] = rs;
  }
}

template <typename T>
void norm_fwd_kernel(const T* x, const T* res, const T* w, const T* b, T* y, T* h, float* mean, float* rstd,
                     int64_t rows, int64_t n, float eps, bool rms) {
  const auto fn = best_isa<fwd_rows<T>>();
  std::vector<float> wf(n), bf(n, 0.f);
  to_float(w, wf.data(), n);
  if (b) to_float(b, bf.data(), n);
  at::parallel_for(0, rows, std::max<int64_t>(1, 32768 / n), [&](int64_t r0, int64_t r1) {
    std::vector<float> buf(n), tmp(n);
    fn(x, res, wf.data(), bf.data(), y, h, mean, rstd, r0, r1, n, eps, rms, buf.data(), tmp.data());
  });
}

// rows [r0, r1) of dx; their dw, db terms added into accw, accb; xh, g, gw: n floats each
template <typename T>
HOT void bwd_rows(const T* dy, const T* hin, const T* dh, const float* wf, const float* mean, const float* rstd, T* dx,
                  float* accw, float* accb, int64_t r0, int64_t r1, int64_t n, bool rms, float* xh, float* g,
                  float* gw) {
  for (int64_t r = r0; r < r1; ++r) {
    const float mu = rms ? 0.f : mean[r], rs = rstd[r];
    to_float(hin + r * n, xh, n);
    to_float(dy + r * n, g, n);
    for (int64_t i = 0; i < n; ++i) xh[i] = (xh[i] - mu) * rs;
    for (int64_t i = 0; i < n; ++i) gw[i] = g[i] * wf[i];
    const float m1 = rms ? 0.f : sum8(gw, n) / n;
    const float m2 = dot8(gw, xh, n) / n;
    for (int64_t i = 0; i < n; ++i) gw[i] = rs * (gw[i] - m1 - xh[i] * m2);
    if (dh) {
      const T* dhr = dh + r * n;
      for (int64_t i = 0; i < n; ++i) gw[i] += static_cast<float>(dhr[i]);
    }
    T* dxr = dx + r * n;
    for (int64_t i = 0; i < n; ++i) dxr[i] = static_cast<T>(gw[i]);
    for (int64_t i = 0; i < n; ++i) accw[i] += g[i] * xh[i];
    for (int64_t i = 0; i < n; ++i) accb[i] += g[i];
  }
}

// dx = rstd * (g - mean(g) - xhat * mean(g * xhat)), g = dy * w  (RMS: no mean(g) term)
// dw, db: per-chunk fp32 partials summed afterwards (deterministic for a given thread count).
template <typename T>
void norm_bwd_kernel(const T* dy, const T* hin, const T* dh, const T* w, const float* mean, const float* rstd,
                     T* dx, T* dw, T* db, int64_t rows, int64_t n, bool rms) {
  const auto fn = best_isa<bwd_rows<T>>();
  std::vector<float> wf(n);
  to_float(w, wf.data(), n);
  const int64_t chunks = std::max<int64_t>(1, std::min<int64_t>(rows, 4 * at::get_num_threads()));
  std::vector<float> pw(chunks * n, 0.f), pb(chunks * n, 0.f);
  at::parallel_for(0, chunks, 1, [&](int64_t c0, int64_t c1) {
    std::vector<float> xh(n), g(n), gw(n);
    for (int64_t c = c0; c < c1; ++c)
      fn(dy, hin, dh, wf.data(), mean, rstd, dx, pw.data() + c * n, pb.data() + c * n, c * rows / chunks,
         (c + 1) * rows / chunks, n, rms, xh.data(), g.data(), gw.data());
  });
  at::parallel_for(0, n, 256, [&](int64_t i0, int64_t i1) {
    for (int64_t i = i0; i < i1; ++i) {
      float sw = 0.f, sb = 0.f;
      for (int64_t c = 0; c < chunks; ++c) {
        sw += pw[c * n + i];
        sb += pb[c * n + i];
      }
      dw[i] = static_cast<T>(sw);
      if (db) db[i] = static_cast<T>(sb);
    }
  });
}

template <typename T>
const T* ptr_or_null(const c10::optional<at::Tensor>& t) {
  return t.has_value() && t->defined() ? t->data_ptr<T>() : nullptr;
}

}  // namespace

// x, residual (rows, n); w, b (n) -> {y, h = x + residual (undefined without residual), mean, rstd}
std::vector<at::Tensor> norm_fwd_cpu(const at::Tensor& x, const c10::optional<at::Tensor>& residual,
                                     const at::Tensor& w, const c10::optional<at::Tensor>& b, double eps, bool rms) {
  const int64_t rows = x.size(0), n = x.size(1);
  auto y = at::empty_like(x);
  at::Tensor h = residual.has_value() ? at::empty_like(x) : at::Tensor();
  auto mean = at::empty({rows}, x.options().dtype(at::kFloat)), rstd = at::empty_like(mean);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "norm_fwd_cpu", [&] {
    norm_fwd_kernel<scalar_t>(x.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(residual), w.data_ptr<scalar_t>(),
                              ptr_or_null<scalar_t>(b), y.data_ptr<scalar_t>(),
                              h.defined() ? h.data_ptr<scalar_t>() : nullptr, mean.data_ptr<float>(),
                              rstd.data_ptr<float>(), rows, n, static_cast<float>(eps), rms);
  });
  return {y, h, mean, rstd};
}

// dy, h (rows, n), dh (rows, n) or none: the incoming grad of the h output -> {dx, dw, db}
std::vector<at::Tensor> norm_bwd_cpu(const at::Tensor& dy, const at::Tensor& h, const c10::optional<at::Tensor>& dh,
                                     const at::Tensor& w, const at::Tensor& mean, const at::Tensor& rstd,
                                     bool has_bias, bool rms) {
  const int64_t rows = h.size(0), n = h.size(1);
  auto dx = at::empty_like(h), dw = at::empty_like(w);
  at::Tensor db = has_bias ? at::empty_like(w) : at::Tensor();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, h.scalar_type(), "norm_bwd_cpu", [&] {
    norm_bwd_kernel<scalar_t>(dy.data_ptr<scalar_t>(), h.data_ptr<scalar_t>(), ptr_or_null<scalar_t>(dh),
                              w.data_ptr<scalar_t>(), mean.data_ptr<float>(), rstd.data_ptr<float>(),
                              dx.data_ptr<scalar_t>(), dw.data_ptr<scalar_t>(),
                              has_bias ? db.data_ptr<scalar_t>() : nullptr, rows, n, rms);
  });
  return {dx, dw, db};
}
