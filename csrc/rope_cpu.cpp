// The two elementwise steps of a llama layer on CPU (csrc/decode_cpu.cpp's decode_layer, and
// kernels.glu.swiglu for prefill): one loop each instead of a chain of ATen ops, whose
// per-op dispatch dominates on a decode batch. Both run as the widest ISA copy this CPU has
// (best_isa, simd_cpu.h): swiglu's exp8 needs the vector width.
#include <ATen/Parallel.h>

#include <cmath>

#include "ops.h"
#include "simd_cpu.h"

namespace {

// rows [b0, b1) of t (ld floats apart), their first `heads` heads of D, rotated in place
HOT void rope_rows(float* p, int64_t ld, const float* c, const float* s, int64_t b0, int64_t b1, int64_t heads,
                   int64_t D) {
  const int64_t half = D / 2;
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

// rows [b0, b1): y (ff) = silu(gate) * up from f = [gate | up] (2 ff)
HOT void swiglu_rows(const float* src, float* dst, int64_t b0, int64_t b1, int64_t ff) {
  for (int64_t b = b0; b < b1; ++b) {
    const float *g = src + b * 2 * ff, *u = g + ff;
    float* row = dst + b * ff;
    int64_t i = 0;
    for (; i + 8 <= ff; i += 8) {
      const f8 gv = load8(g + i);
      store8(row + i, gv / (1.f + exp8(-gv)) * load8(u + i));
    }
    for (; i < ff; ++i) row[i] = g[i] / (1.f + std::exp(-g[i])) * u[i];
  }
}

}  // namespace

// In place, HF rotate_half form: for each of t's first `heads` heads (t: (B, heads', D) with rows
// dense), x1, x2 = halves; x1 <- x1 cos - x2 sin, x2 <- x2 cos + x1 sin. cos, sin: (B, D/2).
void rope_cpu_(at::Tensor& t, const at::Tensor& cos, const at::Tensor& sin, int64_t heads) {
  const auto fn = best_isa<rope_rows>();
  float* p = t.data_ptr<float>();
  const float *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
  const int64_t ld = t.stride(0), D = t.size(2);
  at::parallel_for(0, t.size(0), 16, [&](int64_t b0, int64_t b1) { fn(p, ld, c, s, b0, b1, heads, D); });
}

// f (B, 2 ff) = [gate | up] -> silu(gate) * up, (B, ff)
at::Tensor swiglu_cpu(const at::Tensor& f) {
  const auto fn = best_isa<swiglu_rows>();
  const int64_t B = f.size(0), ff = f.size(1) / 2;
  auto y = at::empty({B, ff}, f.options());
  const float* src = f.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) { fn(src, dst, b0, b1, ff); });
  return y;
}
