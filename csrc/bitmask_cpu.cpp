// Structured outputs' token mask applied to the sampler's logits on CPU, in place: a bit per token,
// 32 tokens a word (llguidance's layout). A grammar's mask is mostly whole words, all allowed or all
// refused, so a word is skipped or its 32 logits set at once; only mixed words go bit by bit.
#include <ATen/Parallel.h>

#include <algorithm>
#include <limits>

#include "ops.h"

// logits (B, V) float32 contiguous; rows (R,) int64 in [0, B), distinct; bitmask (R, W) int32
// contiguous: row rows[r]'s token t stays where bit t % 32 of word t / 32 is set, else -inf, and
// tokens past 32 W are -inf. Checked by the binding.
void apply_token_bitmask_cpu_(at::Tensor& logits, const at::Tensor& rows, const at::Tensor& bitmask) {
  const int64_t V = logits.size(1), R = rows.size(0), W = bitmask.size(1);
  const int64_t* rp = rows.data_ptr<int64_t>();
  const uint32_t* mp = reinterpret_cast<const uint32_t*>(bitmask.data_ptr<int32_t>());
  float* lp = logits.data_ptr<float>();
  constexpr float NEG = -std::numeric_limits<float>::infinity();
  at::parallel_for(0, R, 1, [&](int64_t r0, int64_t r1) {
    for (int64_t r = r0; r < r1; ++r) {
      float* y = lp + rp[r] * V;
      const uint32_t* m = mp + r * W;
      for (int64_t w = 0; w < W && w * 32 < V; ++w) {
        const uint32_t bits = m[w];
        if (bits == ~0u) continue;
        const int64_t n = std::min<int64_t>(32, V - w * 32);
        float* yw = y + w * 32;
        if (bits == 0) {
          std::fill(yw, yw + n, NEG);
        } else {
          for (int64_t t = 0; t < n; ++t)
            if (!((bits >> t) & 1u)) yw[t] = NEG;
        }
      }
      if (W * 32 < V) std::fill(y + W * 32, y + V, NEG);
    }
  });
}
