#pragma once
// The paged KV cache's storage formats on CPU (kv_cache_dtype): the compute dtype, bfloat16, or
// int8 with one fp32 scale per (slot, KV head) row, symmetric: value = q * scale, scale = absmax
// / 127 (1 for an all-zero row). The readers convert a block's rows to fp32 as they stream them;
// no dequantised copy of the cache exists. kernels.reference.store_kvcache is the write's twin.
#include <ATen/ATen.h>

#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <type_traits>

#include "simd_cpu.h"

// Calls f(TC{}) with TC the C++ type of a cache of dtype c, read against a query of type T: the
// checks allow T's own dtype, bfloat16 and int8.
template <typename T, typename F>
void with_cache_type(at::ScalarType c, F&& f) {
  if (c == at::kChar)
    f(int8_t{});
  else if (c == at::kBFloat16)
    f(c10::BFloat16{});
  else
    f(T{});
}

// element d of a cache row as fp32; s the row's scale (int8 only)
template <typename TC>
inline float kv_value(const TC* row, int64_t d, float s) {
  if constexpr (std::is_same_v<TC, int8_t>)
    return static_cast<float>(row[d]) * s;
  else
    return static_cast<float>(row[d]);
}

// 8 cache values from p as floats (bfloat16 and int8 widened exactly; int8's scale is the caller's)
template <typename T>
HOT f8 load8c(const T* p) {  // float16
  f8 r;
  for (int i = 0; i < 8; ++i) r[i] = static_cast<float>(p[i]);
  return r;
}
HOT f8 load8c(const float* p) { return load8(p); }
HOT f8 load8c(const c10::BFloat16* p) { return load8_bf16(p); }
HOT f8 load8c(const int8_t* p) { return load8_i8(p); }

// Where element d of a D-long cache row sits in the fp32 vectors its reader works in. bfloat16 and
// int8 rows are widened C values at a time (16: load16_bf16_split; 32: load32_i8_split) into C / 8
// vectors: lanes 0-3 and C/2 .. C/2+3 into the first, 4-7 and C/2+4 .. C/2+7 into the next, and so on.
// The readers hold q and the output in that order; a row's last D % C values are widened in order.
template <typename TC>
constexpr int64_t kv_chunk() {
  return std::is_same_v<TC, c10::BFloat16> ? 16 : std::is_same_v<TC, int8_t> ? 32 : 0;
}
template <typename TC>
inline int64_t kv_lane(int64_t d, int64_t D) {
  constexpr int64_t C = kv_chunk<TC>();
  if constexpr (C == 0) {
    return d;
  } else {
    const int64_t r = d % C, base = d - r;
    if (base + C > D) return d;
    return base + 8 * (r % (C / 2) / 4) + r % 4 + 4 * (r / (C / 2));
  }
}

// kv_chunk<TC>() cache values at p as that many / 8 fp32 vectors, in kv_lane's order
HOT void kv_split(const c10::BFloat16* p, f8* w) { load16_bf16_split(p, w[0], w[1]); }
HOT void kv_split(const int8_t* p, f8* w) { load32_i8_split(p, w); }

// One row x (D) into the cache's format: a cast, or for int8 the row's scale into *s and
// round-half-even(x / scale) into out
template <typename T, typename TC>
inline void kv_write(const T* x, int64_t D, TC* out, float* s) {
  if constexpr (std::is_same_v<TC, int8_t>) {
    float amax = 0.f;
    for (int64_t d = 0; d < D; ++d) amax = std::max(amax, std::fabs(static_cast<float>(x[d])));
    const float sc = amax > 0.f ? amax / 127.f : 1.f;
    for (int64_t d = 0; d < D; ++d)
      out[d] = static_cast<int8_t>(std::clamp(std::nearbyint(static_cast<float>(x[d]) / sc), -127.f, 127.f));
    *s = sc;
  } else {
    for (int64_t d = 0; d < D; ++d) out[d] = static_cast<TC>(static_cast<float>(x[d]));
  }
}

// a scale tensor's data, or null for a cache without scales
inline float* scale_ptr(const c10::optional<at::Tensor>& s) {
  return s.has_value() && s->defined() ? s->data_ptr<float>() : nullptr;
}
