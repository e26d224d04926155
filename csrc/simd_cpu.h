#pragma once
// 8-float vectors for the hand-written CPU kernels, and their run-time ISA dispatch (best_isa).
// GCC/Clang lower f8 to whatever the target has (2 SSE or 1 AVX register), so loops are
// vectorised explicitly rather than left to the auto-vectoriser. Every helper is forced inline
// so each target-specific copy of a kernel gets its own code.
#include <algorithm>
#include <cmath>
#include <cstdint>
#include <cstring>

#define HOT inline __attribute__((always_inline))

typedef float f8 __attribute__((vector_size(32)));
typedef int32_t i8 __attribute__((vector_size(32)));

HOT f8 load8(const float* p) {
  f8 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

HOT void store8(float* p, f8 v) { std::memcpy(p, &v, sizeof(v)); }

typedef uint16_t u16x8 __attribute__((vector_size(16)));
typedef int16_t s16x8 __attribute__((vector_size(16)));
typedef int8_t s8x8 __attribute__((vector_size(8)));

// 8 bfloat16 values at p widened to fp32 (exact: bfloat16 is a float's top half)
HOT f8 load8_bf16(const void* p) {
  u16x8 h;
  std::memcpy(&h, p, sizeof(h));
  const i8 b = __builtin_convertvector(h, i8) << 16;
  f8 v;
  std::memcpy(&v, &b, sizeof(v));
  return v;
}

// 8 int8 values at p as fp32; through int16: GCC lowers a direct int8 -> fp32 vector conversion one
// lane at a time
HOT f8 load8_i8(const void* p) {
  s8x8 q;
  std::memcpy(&q, p, sizeof(q));
  return __builtin_convertvector(__builtin_convertvector(__builtin_convertvector(q, s16x8), i8), f8);
}

HOT float hsum(f8 v) { return ((v[0] + v[1]) + (v[2] + v[3])) + ((v[4] + v[5]) + (v[6] + v[7])); }

typedef float f4 __attribute__((vector_size(16)));

// {a[0] + a[1], a[2] + a[3], b[0] + b[1], b[2] + b[3], then the same for lanes 4..7}: AVX's vhaddps
#ifdef __clang__
#define SHUFFLE8(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE8(a, b, ...) __builtin_shuffle(a, b, i8{__VA_ARGS__})
#endif
HOT f8 hadd(f8 a, f8 b) {
  return SHUFFLE8(a, b, 0, 2, 8, 10, 4, 6, 12, 14) + SHUFFLE8(a, b, 1, 3, 9, 11, 5, 7, 13, 15);
}

// Each 16-bit value of w into the top half of a 32-bit lane, zeros below, within 128-bit halves: lanes
// 0-3, 8-11 into lo and 4-7, 12-15 into hi. AVX2 does each in one instruction (vpunpcklwd / vpunpckhwd
// against zero), where widening in order takes five per 8 values.
typedef int16_t s16x16 __attribute__((vector_size(32)));
#ifdef __clang__
#define SHUFFLE16(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE16(a, b, ...) __builtin_shuffle(a, b, s16x16{__VA_ARGS__})
#endif
HOT void widen16_split(s16x16 w, i8& lo, i8& hi) {
  const s16x16 z = {}, l = SHUFFLE16(z, w, 0, 16, 1, 17, 2, 18, 3, 19, 8, 24, 9, 25, 10, 26, 11, 27),
               u = SHUFFLE16(z, w, 4, 20, 5, 21, 6, 22, 7, 23, 12, 28, 13, 29, 14, 30, 15, 31);
  std::memcpy(&lo, &l, sizeof(lo));
  std::memcpy(&hi, &u, sizeof(hi));
}

// 16 bfloat16 values at p widened to fp32 (a bfloat16 is a float's top half) as two vectors, in
// widen16_split's order; kv_lane (kv_cpu.h) is the order it leaves.
HOT void load16_bf16_split(const void* p, f8& lo, f8& hi) {
  s16x16 h;
  std::memcpy(&h, p, sizeof(h));
  i8 l, u;
  widen16_split(h, l, u);
  std::memcpy(&lo, &l, sizeof(lo));
  std::memcpy(&hi, &u, sizeof(hi));
}

// 32 int8 values at p as four fp32 vectors: lanes 0-3, 16-19 | 4-7, 20-23 | 8-11, 24-27 | 12-15, 28-31.
// The bytes are interleaved with zeros within 128-bit halves (one instruction per vector in AVX2),
// then each 16-bit half by widen16_split, which puts every byte at the top of a 32-bit lane; an
// arithmetic shift brings it down.
typedef int8_t s8x32 __attribute__((vector_size(32)));
#ifdef __clang__
#define SHUFFLE32(a, b, ...) __builtin_shufflevector(a, b, __VA_ARGS__)
#else
#define SHUFFLE32(a, b, ...) __builtin_shuffle(a, b, s8x32{__VA_ARGS__})
#endif
HOT void load32_i8_split(const void* p, f8 out[4]) {
  s8x32 y;
  std::memcpy(&y, p, sizeof(y));
  const s8x32 z = {};
  const s8x32 halves[2] = {
      SHUFFLE32(z, y, 0, 32, 1, 33, 2, 34, 3, 35, 4, 36, 5, 37, 6, 38, 7, 39, 16, 48, 17, 49, 18, 50, 19, 51, 20, 52,
                21, 53, 22, 54, 23, 55),
      SHUFFLE32(z, y, 8, 40, 9, 41, 10, 42, 11, 43, 12, 44, 13, 45, 14, 46, 15, 47, 24, 56, 25, 57, 26, 58, 27, 59, 28,
                60, 29, 61, 30, 62, 31, 63)};
  for (int h = 0; h < 2; ++h) {
    s16x16 w;
    std::memcpy(&w, &halves[h], sizeof(w));
    i8 a, b;
    widen16_split(w, a, b);
    out[2 * h] = __builtin_convertvector(a >> 24, f8);
    out[2 * h + 1] = __builtin_convertvector(b >> 24, f8);
  }
}

// The sums of four vectors at once: {sum a, sum b, sum c, sum d}
HOT f4 hsum4(f8 a, f8 b, f8 c, f8 d) {
  const f8 s = hadd(hadd(a, b), hadd(c, d));
  return f4{s[0], s[1], s[2], s[3]} + f4{s[4], s[5], s[6], s[7]};
}

// e^x for x <= 88 (below -87.3 it returns e^-87.3 ~ 1e-38), Cephes' expf: x = n ln2 + r with
// |r| <= ln2 / 2, e^r by a degree-6 polynomial, 2^n through the exponent bits; ~1 ulp.
HOT f8 exp8(f8 x) {
  const f8 lo = f8{} - 87.3f, hi = f8{} + 88.f;
  x = x < lo ? lo : x;
  x = x > hi ? hi : x;
  const f8 t = x * 1.44269504f + 0.5f;
  f8 n = __builtin_convertvector(__builtin_convertvector(t, i8), f8);  // truncates toward zero
  n = n > t ? n - 1.f : n;                                              // floor(x / ln2 + 1/2)
  const f8 r = x - n * 0.693359375f + n * 2.12194440e-4f;  // Cody-Waite: ln2 in two parts
  f8 p = 1.9875691500e-4f * r + 1.3981999507e-3f;
  p = p * r + 8.3334519073e-3f;
  p = p * r + 4.1665795894e-2f;
  p = p * r + 1.6666665459e-1f;
  p = p * r + 5.0000001201e-1f;
  p = p * r * r + r + 1.f;
  const i8 e = (__builtin_convertvector(n, i8) + 127) << 23;
  f8 scale;
  std::memcpy(&scale, &e, sizeof(scale));
  return p * scale;
}

// GELU, tanh form: 0.5 u (1 + tanh z) = u / (1 + e^(-2z)), z = sqrt(2/pi) (u + 0.044715 u^3)
HOT f8 gelu_tanh8(f8 u) {
  const f8 z = 0.7978845608f * (u + 0.044715f * u * u * u);
  return u / (1.f + exp8(-2.f * z));
}

// s[0, n) <- exp(s - max s): a softmax row's numerators in place; returns their sum
HOT float exp_row(float* s, int64_t n) {
  const float m = *std::max_element(s, s + n);
  f8 z8 = {};
  int64_t t = 0;
  for (; t + 8 <= n; t += 8) {
    const f8 e = exp8(load8(s + t) - m);
    store8(s + t, e);
    z8 += e;
  }
  float z = hsum(z8);
  for (; t < n; ++t) z += (s[t] = std::exp(s[t] - m));
  return z;
}

// Run-time ISA dispatch. A kernel is written once as a HOT (always inlined) function;
// best_isa<kernel>() returns a copy of it compiled for the widest ISA this CPU runs (AVX2+FMA) or
// the plain build. Built for plain x86-64 the kernels would run at SSE width, and -march=native
// would make a binary that faults on older CPUs.
#if defined(__GNUC__) && (defined(__x86_64__) || defined(__i386__))
#define HAVE_AVX2_CLONES 1
#define AVX2 __attribute__((target("avx2,fma")))
inline bool cpu_has_avx2() {
  static const bool ok = __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
  return ok;
}
// Kernels with their own 16-float code (f16 in 32 registers) are compiled for this target directly.
#define AVX512 __attribute__((target("avx512f,avx2,fma")))
inline bool cpu_has_avx512() {
  static const bool ok = cpu_has_avx2() && __builtin_cpu_supports("avx512f");
  return ok;
}
// AVX-512 VNNI's integer dot products (vpdpbusd), for kernels whose arithmetic is integer
#define VNNI __attribute__((target("avx512f,avx512bw,avx512vnni,avx2,fma")))
inline bool cpu_has_vnni() {
  static const bool ok = cpu_has_avx512() && __builtin_cpu_supports("avx512bw") && __builtin_cpu_supports("avx512vnni");
  return ok;
}
#endif

template <auto kernel>
struct isa_clones;

template <typename... A, void (*kernel)(A...)>
struct isa_clones<kernel> {
  using fn = void (*)(A...);
  static void generic(A... a) { kernel(a...); }
#ifdef HAVE_AVX2_CLONES
  AVX2 static void avx2(A... a) { kernel(a...); }
#endif
};

template <auto kernel>
typename isa_clones<kernel>::fn best_isa() {
#ifdef HAVE_AVX2_CLONES
  if (cpu_has_avx2()) return isa_clones<kernel>::avx2;
#endif
  return isa_clones<kernel>::generic;
}

typedef float f16 __attribute__((vector_size(64)));
