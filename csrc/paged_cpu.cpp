// Paged KV cache on CPU: decode attention (one query token per sequence) and the cache write.
// The engine's CPU decode step calls these once per layer, so they work straight from the block
// table: no gather of K/V into a dense tensor, no mask. One work item per (sequence, KV head);
// its H / Hkv query heads share every K/V row read (GQA without repeating K/V).
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <limits>
#include <type_traits>
#include <vector>

#include "checks.h"

namespace {

// 8 independent accumulators: vectorisable without -ffast-math
inline float dot(const float* a, const float* b, int64_t n) {
  float acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8)
    for (int j = 0; j < 8; ++j) acc[j] += a[i + j] * b[i + j];
  for (; i < n; ++i) acc[i & 7] += a[i] * b[i];
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7]));
}

inline void axpy(float* y, float a, const float* x, int64_t n) {
  for (int64_t i = 0; i < n; ++i) y[i] += a * x[i];
}

// a cache row as floats: the row itself for fp32, else converted into buf
template <typename T>
inline const float* as_float(const T* row, float* buf, int64_t n) {
  if constexpr (std::is_same_v<T, float>) {
    return row;
  } else {
    for (int64_t i = 0; i < n; ++i) buf[i] = static_cast<float>(row[i]);
    return buf;
  }
}

template <typename T>
void decode_kernel(const T* q, int64_t q_stride, const T* kc, const T* vc, const int32_t* table, int64_t max_blocks,
                   const int32_t* lens, T* out, int64_t B, int64_t H, int64_t Hkv, int64_t D, int64_t bs, float scale) {
  const int64_t G = H / Hkv;
  at::parallel_for(0, B * Hkv, 1, [&](int64_t i0, int64_t i1) {
    std::vector<float> qf(G * D), acc(G * D), row(D), s, sum(G);
    for (int64_t i = i0; i < i1; ++i) {
      const int64_t b = i / Hkv, g = i % Hkv, L = lens[b];
      const int32_t* tb = table + b * max_blocks;
      for (int64_t h = 0; h < G; ++h)  // pre-scaled query rows of this KV head's group
        for (int64_t d = 0; d < D; ++d) qf[h * D + d] = static_cast<float>(q[b * q_stride + (g * G + h) * D + d]) * scale;
      s.resize(G * L);
      // scores s[h, t]; the cache row of token t is ((block * bs + t % bs) * Hkv + g) * D
      for (int64_t t = 0; t < L; ++t) {
        const float* k = as_float(kc + ((tb[t / bs] * bs + t % bs) * Hkv + g) * D, row.data(), D);
        for (int64_t h = 0; h < G; ++h) s[h * L + t] = dot(qf.data() + h * D, k, D);
      }
      for (int64_t h = 0; h < G; ++h) {  // softmax numerators in place, fp32
        float* sh = s.data() + h * L;
        const float m = *std::max_element(sh, sh + L);
        float z = 0.f;
        for (int64_t t = 0; t < L; ++t) z += (sh[t] = std::exp(sh[t] - m));
        sum[h] = z;
      }
      std::fill(acc.begin(), acc.end(), 0.f);
      for (int64_t t = 0; t < L; ++t) {
        const float* v = as_float(vc + ((tb[t / bs] * bs + t % bs) * Hkv + g) * D, row.data(), D);
        for (int64_t h = 0; h < G; ++h) axpy(acc.data() + h * D, s[h * L + t], v, D);
      }
      for (int64_t h = 0; h < G; ++h)
        for (int64_t d = 0; d < D; ++d) out[(b * H + g * G + h) * D + d] = static_cast<T>(acc[h * D + d] / sum[h]);
    }
  });
}

template <typename T>
void store_kernel(const T* k, const T* v, int64_t k_stride, int64_t v_stride, T* kc, T* vc, const int64_t* slots,
                  int64_t N, int64_t row) {
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t s = slots[n];
      if (s < 0) continue;
      std::memcpy(kc + s * row, k + n * k_stride, row * sizeof(T));
      std::memcpy(vc + s * row, v + n * v_stride, row * sizeof(T));
    }
  });
}

}  // namespace

// q (B, H, D) rows may be strided; caches (blocks, bs, Hkv, D) contiguous; checked by the binding
at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_table, const at::Tensor& seq_lens, double scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), bs = k_cache.size(1), Hkv = k_cache.size(2);
  auto out = at::empty({B, H, D}, q.options());
  const at::Tensor table = block_table.contiguous(), lens = seq_lens.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "paged_attention_cpu", [&] {
    decode_kernel<scalar_t>(q.data_ptr<scalar_t>(), q.stride(0), k_cache.data_ptr<scalar_t>(),
                            v_cache.data_ptr<scalar_t>(), table.data_ptr<int32_t>(), table.size(1),
                            lens.data_ptr<int32_t>(), out.data_ptr<scalar_t>(), B, H, Hkv, D, bs,
                            static_cast<float>(scale));
  });
  return out;
}

void store_kvcache_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                       const at::Tensor& slot_mapping) {
  const at::Tensor slots = slot_mapping.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "store_kvcache_cpu", [&] {
    store_kernel<scalar_t>(k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), k.stride(0), v.stride(0),
                           k_cache.data_ptr<scalar_t>(), v_cache.data_ptr<scalar_t>(), slots.data_ptr<int64_t>(),
                           k.size(0), k.size(1) * k.size(2));
  });
}
