// The elementwise steps of a decoder layer on CPU (csrc/decode_cpu.cpp's decode_layer, and
// kernels.rotary.rope_ / kernels.glu.glu for prefill): per-head RMSNorm of q and k, RoPE, and the
// gated MLP's act(gate) * up, one loop each instead of a chain of ATen ops, whose per-op dispatch
// dominates on a decode batch. All run as the widest ISA copy this CPU has (best_isa,
// simd_cpu.h): glu's exp8 needs the vector width.
#include <ATen/Parallel.h>

#include <cmath>

#include "ops.h"
#include "simd_cpu.h"

namespace {

// rows [b0, b1) of t (ld floats apart), their first `heads` heads of D: the first 2 half dims
// rotated in place (x1 = [0, half), x2 = [half, 2 half)), the rest left as they are
HOT void rope_rows(float* p, int64_t ld, const float* c, const float* s, int64_t b0, int64_t b1, int64_t heads,
                   int64_t D, int64_t half) {
  for (int64_t b = b0; b < b1; ++b) {
    const float *cb = c + b * half, *sb = s + b * half;
    for (int64_t h = 0; h < heads; ++h) {
      float *x1 = p + b * ld + h * D, *x2 = x1 + half;
      int64_t i = 0;
      for (; i + 8 <= half; i += 8) {
        const f8 a = load8(x1 + i), z = load8(x2 + i), ci = load8(cb + i), si = load8(sb + i);
        store8(x1 + i, a * ci - z * si);
        store8(x2 + i, z * ci + a * si);
      }
      for (; i < half; ++i) {
        const float a = x1[i], z = x2[i];
        x1[i] = a * cb[i] - z * sb[i];
        x2[i] = z * cb[i] + a * sb[i];
      }
    }
  }
}

// rows [b0, b1) of t (ld floats apart): heads [0, nq) scaled by RMSNorm with weight qw, the next
// nk by kw (a null weight skips its heads), in place
HOT void rms_heads_rows(float* p, int64_t ld, const float* qw, const float* kw, int64_t b0, int64_t b1, int64_t nq,
                        int64_t nk, int64_t D, float eps) {
  for (int64_t b = b0; b < b1; ++b)
    for (int64_t h = qw ? 0 : nq; h < (kw ? nq + nk : nq); ++h) {
      float* x = p + b * ld + h * D;
      const float* w = h < nq ? qw : kw;
      f8 acc = {};
      int64_t i = 0;
      for (; i + 8 <= D; i += 8) {
        const f8 v = load8(x + i);
        acc += v * v;
      }
      float ss = hsum(acc);
      for (; i < D; ++i) ss += x[i] * x[i];
      const float r = 1.f / std::sqrt(ss / static_cast<float>(D) + eps);
      for (i = 0; i + 8 <= D; i += 8) store8(x + i, load8(x + i) * r * load8(w + i));
      for (; i < D; ++i) x[i] = x[i] * r * w[i];
    }
}

template <bool gelu>
HOT f8 gate8(f8 g) {
  if constexpr (gelu) return gelu_tanh8(g);
  else return g / (1.f + exp8(-g));
}

// rows [b0, b1): y (ff) = act(gate) * up from f = [gate | up] (2 ff); act silu, or GELU's tanh form
template <bool gelu>
HOT void glu_rows(const float* src, float* dst, int64_t b0, int64_t b1, int64_t ff) {
  for (int64_t b = b0; b < b1; ++b) {
    const float *g = src + b * 2 * ff, *u = g + ff;
    float* row = dst + b * ff;
    int64_t i = 0;
    for (; i + 8 <= ff; i += 8) store8(row + i, gate8<gelu>(load8(g + i)) * load8(u + i));
    if (i < ff) {  // the tail through the same vector code, so every element gets the same numerics
      float gb[8] = {}, ub[8] = {};
      std::copy(g + i, g + ff, gb);
      std::copy(u + i, u + ff, ub);
      store8(gb, gate8<gelu>(load8(gb)) * load8(ub));
      std::copy(gb, gb + (ff - i), row + i);
    }
  }
}

}  // namespace

// In place, HF rotate_half form: for each of t's first `heads` heads (t: (B, heads', D) with rows
// dense), x1, x2 = the halves of its first R = 2 cos.size(1) dims; x1 <- x1 cos - x2 sin,
// x2 <- x2 cos + x1 sin; dims [R, D) stay. cos, sin: (B, R/2).
void rope_cpu_(at::Tensor& t, const at::Tensor& cos, const at::Tensor& sin, int64_t heads) {
  const auto fn = best_isa<rope_rows>();
  float* p = t.data_ptr<float>();
  const float *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
  const int64_t ld = t.stride(0), D = t.size(2), half = cos.size(1);
  at::parallel_for(0, t.size(0), 16, [&](int64_t b0, int64_t b1) { fn(p, ld, c, s, b0, b1, heads, D, half); });
}

// In place: t (B, heads', D) with rows dense; its heads [0, nq) RMS-normalised and scaled by qw
// (D,), heads [nq, nq + nk) by kw (D,); an absent weight leaves its heads as they are
void rms_heads_cpu_(at::Tensor& t, const OptT& qw, const OptT& kw, int64_t nq, int64_t nk, double eps) {
  const auto fn = best_isa<rms_heads_rows>();
  float* p = t.data_ptr<float>();
  const float* q = present(qw) ? qw->data_ptr<float>() : nullptr;
  const float* k = present(kw) ? kw->data_ptr<float>() : nullptr;
  const int64_t ld = t.stride(0), D = t.size(2);
  const float e = static_cast<float>(eps);
  at::parallel_for(0, t.size(0), 16, [&](int64_t b0, int64_t b1) { fn(p, ld, q, k, b0, b1, nq, nk, D, e); });
}

// f (B, 2 ff) = [gate | up] -> act(gate) * up, (B, ff); act silu, or GELU's tanh form with gelu_tanh
at::Tensor glu_cpu(const at::Tensor& f, bool gelu_tanh) {
  const auto fn = gelu_tanh ? best_isa<glu_rows<true>>() : best_isa<glu_rows<false>>();
  const int64_t B = f.size(0), ff = f.size(1) / 2;
  auto y = at::empty({B, ff}, f.options());
  const float* src = f.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) { fn(src, dst, b0, b1, ff); });
  return y;
}
