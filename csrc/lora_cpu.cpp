// LoRA adapters' updates of one GEMM's output on CPU, S-LoRA's gathered form: y[i] += (x[i] A[s]^T) B[s],
// s = slots[i] (-1: the base model, nothing added), A (L, W, K) and B (L, W, N) the GEMM's slot tensors
// (engine/models/lora.py), then the GEMM's activation over every row. The tokens of one slot go in
// tasks of up to four: each row of A and of B is read once per task, against all of its tokens, and
// no gathered copy of x, padding or per-slot GEMM call is made.
#include <ATen/Parallel.h>

#include <algorithm>
#include <array>
#include <vector>

#include "ops.h"
#include "panels_cpu.h"
#include "simd_cpu.h"

namespace {

constexpr int64_t TOKENS = 4;  // a task's tokens

// tok: m <= TOKENS tokens of slot s
HOT void lora_task(const float* x, const float* a, const float* b, const int64_t* tok, int64_t m, int64_t s,
                   float* y, int64_t W, int64_t K, int64_t N) {
  const int64_t K8 = K & ~int64_t{7}, N8 = N & ~int64_t{7};
  for (int64_t r = 0; r < W; ++r) {
    const float* ar = a + (s * W + r) * K;
    f8 acc[TOKENS] = {};
    for (int64_t k = 0; k < K8; k += 8) {
      const f8 av = load8(ar + k);
      for (int64_t j = 0; j < m; ++j) acc[j] += load8(x + tok[j] * K + k) * av;
    }
    const float* br = b + (s * W + r) * N;
    for (int64_t j = 0; j < m; ++j) {
      const float* xj = x + tok[j] * K;
      float t = hsum(acc[j]);
      for (int64_t k = K8; k < K; ++k) t += xj[k] * ar[k];
      if (t == 0.f) continue;  // a zero row of A (a part's rank below the slot's width) adds nothing
      float* yj = y + tok[j] * N;
      const f8 tv = f8{} + t;
      for (int64_t n = 0; n < N8; n += 8) store8(yj + n, load8(yj + n) + tv * load8(br + n));
      for (int64_t n = N8; n < N; ++n) yj[n] += t * br[n];
    }
  }
}

}  // namespace

// y (M, N) += the LoRA updates of x (M, K), then act (as in linear) over y; a (L, W, K), b (L, W, N)
// float32, slots (M,) int64 in [-1, L): all contiguous, checked by the caller (check_lora)
void lora_add_cpu_(at::Tensor& y, const at::Tensor& x, const at::Tensor& a, const at::Tensor& b,
                   const at::Tensor& slots, int64_t act) {
  const int64_t M = x.size(0), K = x.size(1), L = a.size(0), W = a.size(1), N = b.size(2);
  const int64_t* sp = slots.data_ptr<int64_t>();
  std::vector<int64_t> tok;  // the tokens, slot by slot
  std::vector<std::array<int64_t, 3>> tasks;  // (first token in tok, count, slot)
  for (int64_t s = 0; s < L && W > 0; ++s) {
    const int64_t first = static_cast<int64_t>(tok.size());
    for (int64_t i = 0; i < M; ++i)
      if (sp[i] == s) tok.push_back(i);
    for (int64_t t = first, e = static_cast<int64_t>(tok.size()); t < e; t += TOKENS)
      tasks.push_back({t, std::min(TOKENS, e - t), s});
  }
  const auto fn = best_isa<lora_task>();
  const float *xp = x.data_ptr<float>(), *ap = a.data_ptr<float>(), *bp = b.data_ptr<float>();
  float* yp = y.data_ptr<float>();
  at::parallel_for(0, static_cast<int64_t>(tasks.size()), 1, [&](int64_t t0, int64_t t1) {
    for (int64_t t = t0; t < t1; ++t) fn(xp, ap, bp, tok.data() + tasks[t][0], tasks[t][1], tasks[t][2], yp, W, K, N);
  });
  if (act != 0 && M > 0)  // rows in chunks worth a thread (~64k values)
    at::parallel_for(0, M, std::max<int64_t>(1, 65536 / std::max<int64_t>(N, 1)), [&](int64_t m0, int64_t m1) {
      linear_cpu_activate(static_cast<int>(act), yp + m0 * N, N, m1 - m0, N);
    });
}
