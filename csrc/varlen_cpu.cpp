// Attention over packed variable-length sequences on CPU in fp32: the engine's prefill, every
// prompt of a step in one call, its K/V packed beside q or (chunked prefill, prefix-cache hits)
// read from the paged cache (torch SDPA once per sequence is mostly per-call overhead on short
// prompts). One work item per (sequence, KV head), longest
// first: its keys are transposed once into a (D, L) panel shared by the group's query heads, so
// the scores are the outer-product GEMM form (per d a broadcast of q against two key vectors, no
// horizontal sums); a tile of MQ query rows then takes an exact two-pass softmax over its scores
// and P V in the same form. Causal masking is bottom-right aligned, as in kernels.flash_attention,
// and so is a sliding window: a tile computes scores only from its first row's first key, so a
// windowed sequence costs O(S x W) (the transpose of its keys is O(S x D)).
#include <ATen/Parallel.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <vector>

#include "kv_cpu.h"
#include "ops.h"
#include "parallel_cpu.h"
#include "simd_cpu.h"

namespace {

constexpr int MQ = 4;   // query rows per tile
constexpr int NK = 16;  // keys per score block, two vectors

// s (rows, lds) [0, nk) = q (rows, D) @ kt (D, ldk)[:, 0, nk); nk a multiple of NK
template <int rows>
HOT void scores(const float* q, int64_t D, const float* kt, int64_t ldk, int64_t nk, float* s, int64_t lds) {
  for (int64_t j = 0; j < nk; j += NK) {
    f8 a[rows][2] = {};
    const float* kp = kt + j;
    for (int64_t d = 0; d < D; ++d, kp += ldk) {
      const f8 k0 = load8(kp), k1 = load8(kp + 8);
      for (int r = 0; r < rows; ++r) {
        const float x = q[r * D + d];
        const f8 qb = {x, x, x, x, x, x, x, x};  // written out: built by a helper, GCC lane-inserts it
        a[r][0] += qb * k0;
        a[r][1] += qb * k1;
      }
    }
    for (int r = 0; r < rows; ++r) {
      store8(s + r * lds + j, a[r][0]);
      store8(s + r * lds + j + 8, a[r][1]);
    }
  }
}

// o (rows, D) [d, d + 8 * vecs) = p (rows, lds) [0, n) @ v (n rows ldv apart, D) [d, d + 8 * vecs)
template <int rows, int vecs>
HOT void pv_cols(const float* p, int64_t lds, const float* v, int64_t ldv, int64_t n, int64_t D, int64_t d, float* o) {
  f8 a[rows][vecs] = {};
  const float* vp = v + d;
  for (int64_t j = 0; j < n; ++j, vp += ldv) {
    f8 vv[vecs];
    for (int c = 0; c < vecs; ++c) vv[c] = load8(vp + 8 * c);
    for (int r = 0; r < rows; ++r) {
      const float x = p[r * lds + j];
      const f8 pb = {x, x, x, x, x, x, x, x};
      for (int c = 0; c < vecs; ++c) a[r][c] += pb * vv[c];
    }
  }
  for (int r = 0; r < rows; ++r)
    for (int c = 0; c < vecs; ++c) store8(o + r * D + d + 8 * c, a[r][c]);
}

// o (rows, D) = p (rows, lds) [0, n) @ v (n rows ldv apart, D); D a multiple of 8: 16 columns a
// pass (two vectors per row keep the FMA units busy), 8 for an odd last vector
template <int rows>
HOT void pv(const float* p, int64_t lds, const float* v, int64_t ldv, int64_t n, int64_t D, float* o) {
  int64_t d = 0;
  for (; d + 16 <= D; d += 16) pv_cols<rows, 2>(p, lds, v, ldv, n, D, d, o);
  if (d < D) pv_cols<rows, 1>(p, lds, v, ldv, n, D, d, o);
}

// Row r sees keys [first[r], nkeys[r]); both grow with r. Scores start at the first row's first key
// (rounded down to a score block): s column c is key j0 + c.
template <int rows>
HOT void tile(const float* q, int64_t D, const float* kt, int64_t ldk, const float* v, int64_t ldv, const int64_t* first,
              const int64_t* nkeys, float* s, float* o) {
  const int64_t j0 = first[0] / NK * NK;
  const int64_t n = std::max<int64_t>(nkeys[rows - 1] - j0, 0);  // the tile's last row reaches furthest
  const int64_t nk = (n + NK - 1) / NK * NK;
  scores<rows>(q, D, kt + j0, ldk, nk, s, ldk);
  float sum[rows];
  for (int r = 0; r < rows; ++r) {  // numerators outside a row's keys are 0, so P V can run over [j0, j0 + n) for all
    float* sr = s + r * ldk;
    const int64_t a = std::min(first[r] - j0, n), e = std::max(nkeys[r] - j0, a);
    sum[r] = e > a ? exp_row(sr + a, e - a) : 0.f;
    std::fill(sr, sr + a, 0.f);
    std::fill(sr + e, sr + n, 0.f);
  }
  pv<rows>(s, ldk, v + j0 * ldv, ldv, n, D, o);
  for (int r = 0; r < rows; ++r) {
    const float inv = sum[r] > 0.f ? 1.f / sum[r] : 0.f;  // a row that sees no key is 0
    for (int64_t d = 0; d < D; ++d) o[r * D + d] *= inv;
  }
}

// One sequence and KV head. q at its first query row (ldq floats between rows), out likewise (ldo);
// sq queries, sk keys. Dense K/V (tb null): k, v at the sequence's first key row, ldk_in / ldv
// floats between rows. Paged (tb: the sequence's block table, bs tokens a block): k, v at the
// caches' first row of this head, key j in slot tb[j / bs] * bs + j % bs; V is gathered into vbuf,
// both converted from the cache's format (kv_cpu.h; ks, vs: int8's scales at this head, Hkv apart).
// Query i sees keys [i + sk - sq - left, i + sk - sq + right], -1 leaving a side open (causal: right 0).
template <typename TC>
HOT void seq_head(const float* q, int64_t ldq, const TC* k, int64_t ldk_in, const TC* vc, int64_t ldv, float* out,
                  int64_t ldo, int64_t sq, int64_t sk, int64_t G, int64_t D, int64_t left, int64_t right, float scale,
                  const int32_t* tb, int64_t bs, const float* ks, const float* vs, int64_t Hkv, float* kt, float* s,
                  float* qt, float* ot, float* vbuf) {
  const int64_t ldk = (sk + NK - 1) / NK * NK;
  for (int64_t j = 0; j < sk; ++j) {
    const int64_t slot = tb ? tb[j / bs] * bs + j % bs : j;
    const TC* kr = k + slot * ldk_in;
    const float sk_ = ks ? ks[slot * Hkv] : 1.f, sv = vs ? vs[slot * Hkv] : 1.f;
    for (int64_t d = 0; d < D; ++d) kt[d * ldk + j] = kv_value(kr, d, sk_);
    if (tb)
      for (int64_t d = 0; d < D; ++d) vbuf[j * D + d] = kv_value(vc + slot * ldv, d, sv);
  }
  for (int64_t d = 0; d < D; ++d) std::fill(kt + d * ldk + sk, kt + (d + 1) * ldk, 0.f);
  // dense K/V are fp32 (TC float): V is read in place
  const float* v = tb ? vbuf : reinterpret_cast<const float*>(vc);
  if (tb) ldv = D;
  const int64_t diag = sk - sq;
  for (int64_t h = 0; h < G; ++h)
    for (int64_t i0 = 0; i0 < sq; i0 += MQ) {
      const int rows = static_cast<int>(std::min<int64_t>(MQ, sq - i0));
      int64_t first[MQ], nkeys[MQ];
      for (int r = 0; r < rows; ++r) {
        for (int64_t d = 0; d < D; ++d) qt[r * D + d] = q[(i0 + r) * ldq + h * D + d] * scale;
        nkeys[r] = right >= 0 ? std::clamp<int64_t>(i0 + r + diag + right + 1, 0, sk) : sk;
        first[r] = left >= 0 ? std::clamp<int64_t>(i0 + r + diag - left, 0, sk) : 0;
      }
      switch (rows) {
        case 4: tile<4>(qt, D, kt, ldk, v, ldv, first, nkeys, s, ot); break;
        case 3: tile<3>(qt, D, kt, ldk, v, ldv, first, nkeys, s, ot); break;
        case 2: tile<2>(qt, D, kt, ldk, v, ldv, first, nkeys, s, ot); break;
        default: tile<1>(qt, D, kt, ldk, v, ldv, first, nkeys, s, ot);
      }
      for (int r = 0; r < rows; ++r) std::memcpy(out + (i0 + r) * ldo + h * D, ot + r * D, D * sizeof(float));
    }
}

}  // namespace

// q (Nq, H, D) float32 with dense rows; cu_q, cu_k (B + 1) int32 offsets (checked by the binding).
// Without block_table, k and v (Nk, Hkv, D) float32 with dense rows, packed like q. With block_table
// (B, max_blocks) int32, k and v are contiguous paged caches (blocks, bs, Hkv, D) in float32, bfloat16
// or int8 with k_scale/v_scale (blocks, bs, Hkv), and sequence b has cu_k[b + 1] - cu_k[b] cached keys.
// window_left / window_right: FlashAttention's window, -1 unbounded; causal fixes the right edge at 0.
// -> out (Nq, H, D)
at::Tensor varlen_attention_cpu(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v, const at::Tensor& cu_q,
                                const at::Tensor& cu_k, bool causal, double scale, const at::Tensor& block_table,
                                int64_t window_left, int64_t window_right, const OptT& k_scale, const OptT& v_scale) {
  const int64_t right = causal ? 0 : window_right;
  const bool paged = block_table.defined();
  const int64_t H = q.size(1), D = q.size(2), Hkv = k.size(-2), G = H / Hkv, B = cu_q.size(0) - 1;
  const int64_t bs = paged ? k.size(1) : 1, ldkv = paged ? Hkv * D : k.stride(0);
  auto out = at::empty(q.sizes(), q.options());
  const int32_t *cq = cu_q.data_ptr<int32_t>(), *ck = cu_k.data_ptr<int32_t>();
  const int32_t* tb = paged ? block_table.data_ptr<int32_t>() : nullptr;
  int64_t max_sk = 0;
  for (int64_t b = 0; b < B; ++b) max_sk = std::max<int64_t>(max_sk, ck[b + 1] - ck[b]);
  const int64_t ld = (max_sk + NK - 1) / NK * NK;
  const float* qp = q.data_ptr<float>();
  const float *ks = scale_ptr(k_scale), *vs = scale_ptr(v_scale);
  float* op = out.data_ptr<float>();
  struct Scratch {
    std::vector<float> kt, s, qt, ot, vbuf;
  };
  with_cache_type<float>(k.scalar_type(), [&](auto tag) {
    using TC = decltype(tag);
    const auto fn = best_isa<seq_head<TC>>();
    const TC *kp = static_cast<const TC*>(k.data_ptr()), *vp = static_cast<const TC*>(v.data_ptr());
    longest_first(
        B * Hkv, [&](int64_t i) { return ck[i / Hkv + 1] - ck[i / Hkv]; },
        [&] { return Scratch{std::vector<float>(D * ld), std::vector<float>(MQ * ld), std::vector<float>(MQ * D),
                             std::vector<float>(MQ * D), std::vector<float>(paged ? ld * D : 0)}; },
        [&](int64_t i, Scratch& t) {
          const int64_t b = i / Hkv, g = i % Hkv;
          const int64_t sq = cq[b + 1] - cq[b], sk = ck[b + 1] - ck[b];
          if (sq == 0) return;
          const int64_t ldv = paged ? ldkv : v.stride(0);
          // paged: rows are addressed through the table from the caches' start
          const int64_t kfirst = paged ? 0 : ck[b] * ldkv, vfirst = paged ? 0 : ck[b] * ldv;
          fn(qp + cq[b] * q.stride(0) + g * G * D, q.stride(0), kp + kfirst + g * D, ldkv, vp + vfirst + g * D, ldv,
             op + cq[b] * H * D + g * G * D, H * D, sq, sk, G, D, window_left, right, static_cast<float>(scale),
             paged ? tb + b * block_table.size(1) : nullptr, bs, ks ? ks + g : nullptr, vs ? vs + g : nullptr, Hkv,
             t.kt.data(), t.s.data(), t.qt.data(), t.ot.data(), t.vbuf.data());
        });
  });
  return out;
}
