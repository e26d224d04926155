// The two elementwise steps of a llama decode layer on CPU (csrc/bindings.cpp's decode_layer):
// as ATen ops on a decode batch they cost ~100 us a layer in dispatch, as loops a few us.
#include <ATen/Parallel.h>

#include <cmath>

#include "checks.h"
#include "simd_cpu.h"

// In place, HF rotate_half form: for each of t's first `heads` heads (t: (B, heads', D) with rows
// dense), x1, x2 = halves; x1 <- x1 cos - x2 sin, x2 <- x2 cos + x1 sin. cos, sin: (B, D/2).
void rope_cpu_(at::Tensor& t, const at::Tensor& cos, const at::Tensor& sin, int64_t heads) {
  const int64_t B = t.size(0), D = t.size(2), half = D / 2, ld = t.stride(0);
  float* p = t.data_ptr<float>();
  const float *c = cos.data_ptr<float>(), *s = sin.data_ptr<float>();
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
    for (int64_t b = b0; b < b1; ++b)
      for (int64_t h = 0; h < heads; ++h) {
        float* x = p + b * ld + h * D;
        for (int64_t i = 0; i < half; ++i) {
          const float x1 = x[i], x2 = x[half + i], ci = c[b * half + i], si = s[b * half + i];
          x[i] = x1 * ci - x2 * si;
          x[half + i] = x2 * ci + x1 * si;
        }
      }
  });
}

// f (B, 2 ff) = [gate | up] -> silu(gate) * up, (B, ff)
at::Tensor swiglu_cpu(const at::Tensor& f) {
  const int64_t B = f.size(0), ff = f.size(1) / 2;
  auto y = at::empty({B, ff}, f.options());
  const float* src = f.data_ptr<float>();
  float* dst = y.data_ptr<float>();
  at::parallel_for(0, B, 16, [&](int64_t b0, int64_t b1) {
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
  });
  return y;
}
