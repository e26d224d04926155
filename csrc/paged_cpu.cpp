// Paged KV cache on CPU: decode attention (one query token per sequence) and the cache write.
// The engine's CPU decode step calls these once per layer, so they work straight from the block
// table: no gather of K/V into a dense tensor, no mask. One work item per sequence, all heads:
// a cache block's rows for every KV head are one contiguous (block_size x Hkv x D) run, read
// front to back, and each K/V row serves its H / Hkv query heads (GQA without repeating K/V).
// The cache may be stored in another format than q (kv_cpu.h): rows are converted as they stream.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <type_traits>
#include <vector>

#include "kv_cpu.h"
#include "ops.h"
#include "parallel_cpu.h"
#include "simd_cpu.h"

namespace {

// Scores of q against 4 cache rows at once, read in the cache's format (int8 unscaled): 4
// independent accumulators keep the FMA units busy (one dot at a time waits on its own adds).
template <typename T>
HOT void dot4(const float* q, const T* const* k, int64_t n, float* out) {
  f8 a[4] = {};
  int64_t i = 0;
  constexpr int64_t C = kv_chunk<T>(), NV = C / 8;
  if constexpr (C > 0) {  // q in kv_lane's order, C values per step; two sums per row halve each chain
    f8 b[4] = {}, w[NV];
    for (; i + C <= n; i += C) {
      f8 x[NV];
      for (int j = 0; j < NV; ++j) x[j] = load8(q + i + 8 * j);
      for (int r = 0; r < 4; ++r) {
        kv_split(k[r] + i, w);
        for (int j = 0; j < NV; j += 2) {
          a[r] += x[j] * w[j];
          b[r] += x[j + 1] * w[j + 1];
        }
      }
    }
    for (int r = 0; r < 4; ++r) a[r] += b[r];
  }
  for (; i + 8 <= n; i += 8) {
    const f8 x = load8(q + i);
    for (int r = 0; r < 4; ++r) a[r] += x * load8c(k[r] + i);
  }
  const f4 sums = hsum4(a[0], a[1], a[2], a[3]);  // one shuffle tree for the four, not four of their own
  std::memcpy(out, &sums, sizeof(sums));
  for (; i < n; ++i)
    for (int r = 0; r < 4; ++r) out[r] += q[i] * kv_value(k[r], i, 1.f);
}

// y += sum_r p[r] * v[r] over up to 4 rows (in the cache's format): one pass over y per 4 rows
template <typename T>
HOT void axpy4(float* y, const float* p, const T* const* v, int rows, int64_t n) {
  int64_t i = 0;
  constexpr int64_t C = kv_chunk<T>(), NV = C / 8;
  if constexpr (C > 0) {  // y in kv_lane's order, C values per step
    for (; i + C <= n; i += C) {
      f8 acc[NV], w[NV];
      for (int j = 0; j < NV; ++j) acc[j] = load8(y + i + 8 * j);
      for (int r = 0; r < rows; ++r) {
        kv_split(v[r] + i, w);
        for (int j = 0; j < NV; ++j) acc[j] += p[r] * w[j];
      }
      for (int j = 0; j < NV; ++j) store8(y + i + 8 * j, acc[j]);
    }
  }
  for (; i + 8 <= n; i += 8) {
    f8 acc = load8(y + i);
    for (int r = 0; r < rows; ++r) acc += p[r] * load8c(v[r] + i);
    store8(y + i, acc);
  }
  for (; i < n; ++i)
    for (int r = 0; r < rows; ++r) y[i] += p[r] * kv_value(v[r], i, 1.f);
}

// Asks for one KV head's rows of a cache block ahead of use (rows rows of n elements, stride apart):
// blocks sit anywhere in the pool, so the hardware prefetcher loses the stream at every block
// boundary. One head's share at a time, between the heads' work: a whole block asked for at once
// stalls the core on its few outstanding misses with no work to overlap. Into every cache level
// (locality 3), not non-temporal: where prefetchnta fills L1 only, a block does not stay there
// until it is read.
template <typename T>
HOT void prefetch_rows(const T* p, int64_t stride, int64_t rows, int64_t n) {
  for (int64_t o = 0; o < rows; ++o)
    for (int64_t i = 0; i < n; i += 64 / sizeof(T)) __builtin_prefetch(p + o * stride + i, 0, 3);
}

// The rows of one KV head in one cache block: pointers into the cache, read in its format; rs: the
// rows' scales (int8's, sstride apart in sc; 1 for the other formats).
template <typename T>
HOT void block_rows(const T* base, int64_t stride, int64_t rows, const T** out, const float* sc, int64_t sstride,
                    float* rs) {
  for (int64_t o = 0; o < rows; ++o) {
    out[o] = base + o * stride;
    rs[o] = sc ? sc[o * sstride] : 1.f;
  }
}

// One sequence's KV heads [g0, g1) and their query heads, over its keys [first, L) (a sliding window
// starts past 0; blocks before it are never read): scores, fp32 softmax, weighted sum of V. Walks the
// table block by block (no division per token), each block front to back in both passes. s holds H
// rows of L - first.
// ks, vs: int8's scales (blocks, bs, Hkv), else null: a score and a softmax weight take the row's scale
// (rs, bs floats), the rows are read as stored.
template <typename T>
HOT void decode_seq(const float* qf, const T* kc, const T* vc, const float* ks, const float* vs, const int32_t* tb,
                    int64_t first, int64_t L, int64_t H, int64_t Hkv, int64_t g0, int64_t g1, int64_t D, int64_t bs,
                    float* s, float* acc, float* sum, float* rs, const T** rows) {
  const int64_t G = H / Hkv, row = Hkv * D, blk = bs * row, W = L - first, j0 = first / bs, nblk = (L + bs - 1) / bs;
  // block j's tokens in the window: [a, a + n), from offset a - j * bs of the block
  const auto span = [&](int64_t j, int64_t& a, int64_t& n) {
    a = std::max(j * bs, first);
    n = std::min(j * bs + bs, L) - a;
  };
  const auto at = [&](const T* c, int64_t j, int64_t a) { return c + tb[j] * blk + (a - j * bs) * row; };
  // the scales of token a's rows (block j), head g: Hkv apart from one token to the next
  const auto sat = [&](const float* c, int64_t j, int64_t a, int64_t g) {
    return c ? c + (tb[j] * bs + a - j * bs) * Hkv + g : nullptr;
  };
  int64_t a, n, a2, n2;
  span(j0, a, n);
  prefetch_rows(at(kc, j0, a) + g0 * D, row, n, (g1 - g0) * D);
  for (int64_t j = j0; j < nblk; ++j) {
    span(j, a, n);
    span(j + 1 < nblk ? j + 1 : j0, a2, n2);
    const T* next = j + 1 < nblk ? at(kc, j + 1, a2) : at(vc, j0, a2);  // the next K block, or the V pass's first
    for (int64_t g = g0; g < g1; ++g) {
      prefetch_rows(next + g * D, row, n2, D);
      block_rows(at(kc, j, a) + g * D, row, n, rows, sat(ks, j, a, g), Hkv, rs);
      for (int64_t h = g * G; h < (g + 1) * G; ++h) {
        float* sh = s + h * W + (a - first);
        int64_t o = 0;
        for (; o + 4 <= n; o += 4) dot4(qf + h * D, rows + o, D, sh + o);
        for (; o < n; ++o) {
          const T* k4[4] = {rows[o], rows[o], rows[o], rows[o]};
          float out[4];
          dot4(qf + h * D, k4, D, out);
          sh[o] = out[0];
        }
        if (ks)
          for (o = 0; o < n; ++o) sh[o] *= rs[o];
      }
    }
  }
  for (int64_t h = g0 * G; h < g1 * G; ++h) sum[h] = exp_row(s + h * W, W);
  std::fill(acc + g0 * G * D, acc + g1 * G * D, 0.f);
  for (int64_t j = j0; j < nblk; ++j) {
    span(j, a, n);
    const bool more = j + 1 < nblk;
    if (more) span(j + 1, a2, n2);
    for (int64_t g = g0; g < g1; ++g) {
      if (more) prefetch_rows(at(vc, j + 1, a2) + g * D, row, n2, D);
      block_rows(at(vc, j, a) + g * D, row, n, rows, sat(vs, j, a, g), Hkv, rs);
      for (int64_t h = g * G; h < (g + 1) * G; ++h)
        for (int64_t o = 0; o < n; o += 4) {
          const float* p = s + h * W + (a - first) + o;
          const int r = static_cast<int>(std::min<int64_t>(4, n - o));
          float ps[4];
          for (int i = 0; i < r; ++i) ps[i] = vs ? p[i] * rs[o + i] : p[i];
          axpy4(acc + h * D, ps, rows + o, r, D);
        }
    }
  }
}

// left >= 0: each query (its sequence's last token) sees only its last left + 1 keys
template <typename T, typename TC>
void decode_kernel(const T* q, int64_t q_stride, const TC* kc, const TC* vc, const float* ks, const float* vs,
                   const int32_t* table, int64_t max_blocks, const int32_t* lens, T* out, int64_t B, int64_t H,
                   int64_t Hkv, int64_t D, int64_t bs, float scale, int64_t left) {
  const auto fn = best_isa<decode_seq<TC>>();
  const auto first = [&](int64_t b) -> int64_t { return left >= 0 ? std::max<int64_t>(0, lens[b] - 1 - left) : 0; };
  struct Scratch {
    std::vector<float> qf, acc, sum, rs, s;
    std::vector<const TC*> rows;
  };
  // fewer sequences than threads (one stream at a long context): each sequence's KV heads in parts
  const int64_t parts = std::min(Hkv, std::max<int64_t>(1, at::get_num_threads() / std::max<int64_t>(B, 1))),
                G = H / Hkv;
  longest_first(
      B * parts, [&](int64_t i) { return lens[i / parts] - first(i / parts); },
      [&] { return Scratch{std::vector<float>(H * D), std::vector<float>(H * D), std::vector<float>(H),
                           std::vector<float>(bs), {}, std::vector<const TC*>(bs)}; },
      [&](int64_t i, Scratch& t) {
        const int64_t b = i / parts, L = lens[b], f = first(b);
        const int64_t g0 = i % parts * Hkv / parts, g1 = (i % parts + 1) * Hkv / parts;
        for (int64_t h = g0 * G; h < g1 * G; ++h)
          for (int64_t d = 0; d < D; ++d)
            t.qf[h * D + kv_lane<TC>(d, D)] = static_cast<float>(q[b * q_stride + h * D + d]) * scale;
        t.s.resize(H * (L - f));
        fn(t.qf.data(), kc, vc, ks, vs, table + b * max_blocks, f, L, H, Hkv, g0, g1, D, bs, t.s.data(),
           t.acc.data(), t.sum.data(), t.rs.data(), t.rows.data());
        for (int64_t h = g0 * G; h < g1 * G; ++h)
          for (int64_t d = 0; d < D; ++d)
            out[(b * H + h) * D + d] = static_cast<T>(t.acc[h * D + kv_lane<TC>(d, D)] / t.sum[h]);
      });
}

template <typename T, typename TC>
void store_kernel(const T* k, const T* v, int64_t k_stride, int64_t v_stride, TC* kc, TC* vc, float* ks, float* vs,
                  const int64_t* slots, int64_t N, int64_t Hkv, int64_t D) {
  const int64_t row = Hkv * D;
  at::parallel_for(0, N, 64, [&](int64_t n0, int64_t n1) {
    for (int64_t n = n0; n < n1; ++n) {
      const int64_t s = slots[n];
      if (s < 0) continue;
      if constexpr (std::is_same_v<T, TC>) {
        std::memcpy(kc + s * row, k + n * k_stride, row * sizeof(T));
        std::memcpy(vc + s * row, v + n * v_stride, row * sizeof(T));
      } else {
        for (int64_t g = 0; g < Hkv; ++g) {
          kv_write(k + n * k_stride + g * D, D, kc + s * row + g * D, ks ? ks + s * Hkv + g : nullptr);
          kv_write(v + n * v_stride + g * D, D, vc + s * row + g * D, vs ? vs + s * Hkv + g : nullptr);
        }
      }
    }
  });
}

}  // namespace

// q (B, H, D) rows may be strided; caches (blocks, bs, Hkv, D) contiguous, in q's dtype, bfloat16, or int8
// with k_scale/v_scale (blocks, bs, Hkv); checked by the binding.
// window_left >= 0: a sliding window, each query sees its sequence's last window_left + 1 keys
at::Tensor paged_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache, const at::Tensor& v_cache,
                               const at::Tensor& block_table, const at::Tensor& seq_lens, double scale,
                               int64_t window_left, const OptT& k_scale, const OptT& v_scale) {
  const int64_t B = q.size(0), H = q.size(1), D = q.size(2), bs = k_cache.size(1), Hkv = k_cache.size(2);
  auto out = at::empty({B, H, D}, q.options());
  const at::Tensor table = block_table.contiguous(), lens = seq_lens.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, q.scalar_type(), "paged_attention_cpu", [&] {
    with_cache_type<scalar_t>(k_cache.scalar_type(), [&](auto tag) {
      using TC = decltype(tag);
      decode_kernel<scalar_t, TC>(q.data_ptr<scalar_t>(), q.stride(0), static_cast<const TC*>(k_cache.data_ptr()),
                                  static_cast<const TC*>(v_cache.data_ptr()), scale_ptr(k_scale), scale_ptr(v_scale),
                                  table.data_ptr<int32_t>(), table.size(1), lens.data_ptr<int32_t>(),
                                  out.data_ptr<scalar_t>(), B, H, Hkv, D, bs, static_cast<float>(scale), window_left);
    });
  });
  return out;
}

void store_kvcache_cpu(const at::Tensor& k, const at::Tensor& v, at::Tensor& k_cache, at::Tensor& v_cache,
                       const at::Tensor& slot_mapping, const OptT& k_scale, const OptT& v_scale) {
  const at::Tensor slots = slot_mapping.contiguous();
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, k.scalar_type(), "store_kvcache_cpu", [&] {
    with_cache_type<scalar_t>(k_cache.scalar_type(), [&](auto tag) {
      using TC = decltype(tag);
      store_kernel<scalar_t, TC>(k.data_ptr<scalar_t>(), v.data_ptr<scalar_t>(), k.stride(0), v.stride(0),
                                 static_cast<TC*>(k_cache.data_ptr()), static_cast<TC*>(v_cache.data_ptr()),
                                 scale_ptr(k_scale), scale_ptr(v_scale), slots.data_ptr<int64_t>(), k.size(0),
                                 k.size(1), k.size(2));
    });
  });
}
