#pragma once
// The loop every packed CPU GEMM shares (linear_cpu.cpp on fp32, quant_cpu.cpp on bf16 / int8):
// y (M, N) panel by panel. A panel is W output columns; its weights are one contiguous stream of
// pb bytes that every row tile of x reads again, so x goes in blocks of PMB rows (a PMB x K block
// stays in L2) and each panel's bias is loaded once per block.
#include <algorithm>
#include <cstdint>
#include <cstring>

#include "simd_cpu.h"

// act (as in gemm) over rows x n floats of y with row stride ldy, in place (linear_cpu.cpp)
void linear_cpu_activate(int act, float* y, int64_t ldy, int64_t rows, int64_t n);

constexpr int PNR = 24;       // the panel widths: 3 vectors of 8 (AVX2) or of 16 (AVX-512) floats
constexpr int PNR16 = 48;
constexpr int64_t PMB = 128;

// Panels [p0, p1) for all M rows. tile_m(mr, x rows, K, G, panel, bias vectors, y rows, N, nv) runs
// up to MR rows of one panel (G: the weight's group length, where it has groups); act runs on each
// block of y just written, still in cache (0 where the tile applied it).
template <int W, int MR, typename V, auto tile_m>
HOT void panel_loop(const float* x, const char* pw, int64_t pb, const float* bias, float* y, int64_t M, int64_t N,
                    int64_t K, int64_t G, int64_t p0, int64_t p1, int act) {
  static_assert(sizeof(V) * 3 == W * sizeof(float), "a panel is three vectors wide");
  for (int64_t m0 = 0; m0 < M; m0 += PMB) {
    const int64_t m1 = std::min(M, m0 + PMB);
    for (int64_t p = p0; p < p1; ++p) {
      const int nv = static_cast<int>(std::min<int64_t>(W, N - p * W));
      float bb[W] = {};
      if (bias) std::memcpy(bb, bias + p * W, nv * sizeof(float));
      V b[3];
      std::memcpy(b, bb, sizeof(b));
      for (int64_t m = m0; m < m1; m += MR)
        tile_m(static_cast<int>(std::min<int64_t>(MR, m1 - m)), x + m * K, K, G, pw + p * pb, b, y + m * N + p * W,
               N, nv);
      if (act) linear_cpu_activate(act, y + m0 * N + p * W, N, m1 - m0, nv);
    }
  }
}
