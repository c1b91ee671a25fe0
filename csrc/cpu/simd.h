// SIMD traits for the CPU kernels: one struct per instruction set with the same static API,
// so each kernel is written once (kernels.h) and instantiated per ISA in its own translation
// unit (kernels_avx512.cpp, kernels_avx2.cpp, kernels_scalar.cpp) under `#pragma GCC target`.
//
// Every op is one IEEE fp32 operation (correctly rounded), and `fma` is a true fused multiply-add,
// because the kernels reproduce torch's CPU op sequence bit for bit where torch's vectorized
// kernels define it (lerp and add(alpha) use fmadd; addcmul uses fmadd(value*t1, t2, self);
// mul/div/sqrt/add are single roundings). Build with -ffp-contract=off so that the compiler
// never fuses a separate mul + add on its own.
//
// This header must be included AFTER <immintrin.h> and the c10 headers and inside the ISA's
// target pragma region; the scalar traits are always available (and used for loop tails).
#pragma once

#include <cmath>
#include <cstdint>
#include <cstring>

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#ifndef DC_ISA
#error "define DC_ISA (the per-translation-unit namespace) before including simd.h"
#endif

// Everything lives in a per-ISA namespace: the same inline function compiled under different
// target pragmas must not share a symbol (the linker would keep one copy for all ISAs).
namespace dist_cautious_cpu {
namespace DC_ISA {

using bf16 = c10::BFloat16;
using fp16 = c10::Half;

// Scalar traits: one element per "vector"; loads/stores use c10's conversions, which are the
// ones torch's `.copy_` uses (round to nearest even for fp32 -> bf16 / fp16).
struct Scalar {
  using R = float;
  using M = bool;
  static constexpr int W = 1;
  static inline R set1(float x) { return x; }
  static inline R load(const float* p) { return *p; }
  static inline R load(const bf16* p) { return static_cast<float>(*p); }
  static inline R load(const fp16* p) { return static_cast<float>(*p); }
  static inline void store(float* p, R x) { *p = x; }
  static inline void store(bf16* p, R x) { *p = bf16(x); }
  static inline void store(fp16* p, R x) { *p = fp16(x); }
  static inline R add(R a, R b) { return a + b; }
  static inline R sub(R a, R b) { return a - b; }
  static inline R mul(R a, R b) { return a * b; }
  static inline R div(R a, R b) { return a / b; }
  static inline R fma(R a, R b, R c) { return std::fma(a, b, c); }
  static inline R sqrt(R a) { return std::sqrt(a); }
  static inline M gt0(R a) { return a > 0.0f; }
  static inline M lt0(R a) { return a < 0.0f; }
  static inline R select(M m, R a, R b) { return m ? a : b; }
  static inline M mask_and(M a, M b) { return a && b; }
  static inline M mask_or(M a, M b) { return a || b; }
  static inline int count(M m) { return m ? 1 : 0; }
  // lane bits of a mask (lane k -> bit k) and back: the packed codes of the split Lion step
  static inline uint32_t bits(M m) { return m ? 1u : 0u; }
  static inline M from_bits(uint32_t b) { return (b & 1u) != 0; }
  // double accumulators (sums of squares, row sums): D holds W double lanes
  using D = double;
  static inline D dzero() { return 0.0; }
  static inline D dadd(D acc, R x) { return acc + static_cast<double>(x); }
  static inline double dsum(D acc) { return acc; }
};

#if defined(DIST_CAUTIOUS_ISA_AVX2) || defined(DIST_CAUTIOUS_ISA_AVX512)
namespace detail {
// fp32 -> bf16 round to nearest even on 32-bit lanes (NaN -> quiet NaN 0x7fc0, as c10 does).
static inline __m256i bf16_bits_avx2(__m256 x) {
  __m256i u = _mm256_castps_si256(x);
  __m256i lsb = _mm256_and_si256(_mm256_srli_epi32(u, 16), _mm256_set1_epi32(1));
  __m256i r = _mm256_srli_epi32(_mm256_add_epi32(_mm256_add_epi32(u, _mm256_set1_epi32(0x7fff)), lsb), 16);
  __m256i nan = _mm256_castps_si256(_mm256_cmp_ps(x, x, _CMP_UNORD_Q));
  return _mm256_blendv_epi8(r, _mm256_set1_epi32(0x7fc0), nan);
}
}  // namespace detail

// AVX2 + FMA + F16C: 8 fp32 lanes.
struct Avx2 {
  using R = __m256;
  using M = __m256;
  static constexpr int W = 8;
  static inline R set1(float x) { return _mm256_set1_ps(x); }
  static inline R load(const float* p) { return _mm256_loadu_ps(p); }
  static inline R load(const bf16* p) {
    __m256i w = _mm256_cvtepu16_epi32(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p)));
    return _mm256_castsi256_ps(_mm256_slli_epi32(w, 16));
  }
  static inline R load(const fp16* p) { return _mm256_cvtph_ps(_mm_loadu_si128(reinterpret_cast<const __m128i*>(p))); }
  static inline void store(float* p, R x) { _mm256_storeu_ps(p, x); }
  static inline void store(bf16* p, R x) {
    __m256i b = detail::bf16_bits_avx2(x);
    __m256i packed = _mm256_permute4x64_epi64(_mm256_packus_epi32(b, b), 0x08);  // lanes 0, 2
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_castsi256_si128(packed));
  }
  static inline void store(fp16* p, R x) {
    _mm_storeu_si128(reinterpret_cast<__m128i*>(p), _mm256_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static inline R add(R a, R b) { return _mm256_add_ps(a, b); }
  static inline R sub(R a, R b) { return _mm256_sub_ps(a, b); }
  static inline R mul(R a, R b) { return _mm256_mul_ps(a, b); }
  static inline R div(R a, R b) { return _mm256_div_ps(a, b); }
  static inline R fma(R a, R b, R c) { return _mm256_fmadd_ps(a, b, c); }
  static inline R sqrt(R a) { return _mm256_sqrt_ps(a); }
  static inline M gt0(R a) { return _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_GT_OQ); }
  static inline M lt0(R a) { return _mm256_cmp_ps(a, _mm256_setzero_ps(), _CMP_LT_OQ); }
  static inline R select(M m, R a, R b) { return _mm256_blendv_ps(b, a, m); }
  static inline M mask_and(M a, M b) { return _mm256_and_ps(a, b); }
  static inline M mask_or(M a, M b) { return _mm256_or_ps(a, b); }
  static inline int count(M m) { return __builtin_popcount(static_cast<unsigned>(_mm256_movemask_ps(m))); }
  static inline uint32_t bits(M m) { return static_cast<uint32_t>(_mm256_movemask_ps(m)); }
  static inline M from_bits(uint32_t b) {
    const __m256i lane = _mm256_setr_epi32(1, 2, 4, 8, 16, 32, 64, 128);
    return _mm256_castsi256_ps(_mm256_cmpeq_epi32(_mm256_and_si256(_mm256_set1_epi32(static_cast<int>(b)), lane), lane));
  }
  struct D {
    __m256d lo, hi;
  };
  static inline D dzero() { return D{_mm256_setzero_pd(), _mm256_setzero_pd()}; }
  static inline D dadd(D acc, R x) {
    return D{_mm256_add_pd(acc.lo, _mm256_cvtps_pd(_mm256_castps256_ps128(x))), _mm256_add_pd(acc.hi, _mm256_cvtps_pd(_mm256_extractf128_ps(x, 1)))};
  }
  static inline double dsum(D acc) {
    __m256d s = _mm256_add_pd(acc.lo, acc.hi);
    __m128d t = _mm_add_pd(_mm256_castpd256_pd128(s), _mm256_extractf128_pd(s, 1));
    return _mm_cvtsd_f64(t) + _mm_cvtsd_f64(_mm_unpackhi_pd(t, t));
  }
};
#endif

#if defined(DIST_CAUTIOUS_ISA_AVX512)
// AVX-512F: 16 fp32 lanes, k-register masks.
struct Avx512 {
  using R = __m512;
  using M = __mmask16;
  static constexpr int W = 16;
  static inline R set1(float x) { return _mm512_set1_ps(x); }
  static inline R load(const float* p) { return _mm512_loadu_ps(p); }
  static inline R load(const bf16* p) {
    __m512i w = _mm512_cvtepu16_epi32(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p)));
    return _mm512_castsi512_ps(_mm512_slli_epi32(w, 16));
  }
  static inline R load(const fp16* p) { return _mm512_cvtph_ps(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(p))); }
  static inline void store(float* p, R x) { _mm512_storeu_ps(p, x); }
  static inline void store(bf16* p, R x) {
    __m512i u = _mm512_castps_si512(x);
    __m512i lsb = _mm512_and_si512(_mm512_srli_epi32(u, 16), _mm512_set1_epi32(1));
    __m512i r = _mm512_srli_epi32(_mm512_add_epi32(_mm512_add_epi32(u, _mm512_set1_epi32(0x7fff)), lsb), 16);
    __mmask16 nan = _mm512_cmp_ps_mask(x, x, _CMP_UNORD_Q);
    r = _mm512_mask_blend_epi32(nan, r, _mm512_set1_epi32(0x7fc0));
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtepi32_epi16(r));
  }
  static inline void store(fp16* p, R x) {
    _mm256_storeu_si256(reinterpret_cast<__m256i*>(p), _mm512_cvtps_ph(x, _MM_FROUND_TO_NEAREST_INT | _MM_FROUND_NO_EXC));
  }
  static inline R add(R a, R b) { return _mm512_add_ps(a, b); }
  static inline R sub(R a, R b) { return _mm512_sub_ps(a, b); }
  static inline R mul(R a, R b) { return _mm512_mul_ps(a, b); }
  static inline R div(R a, R b) { return _mm512_div_ps(a, b); }
  static inline R fma(R a, R b, R c) { return _mm512_fmadd_ps(a, b, c); }
  static inline R sqrt(R a) { return _mm512_sqrt_ps(a); }
  static inline M gt0(R a) { return _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_GT_OQ); }
  static inline M lt0(R a) { return _mm512_cmp_ps_mask(a, _mm512_setzero_ps(), _CMP_LT_OQ); }
  static inline R select(M m, R a, R b) { return _mm512_mask_blend_ps(m, b, a); }
  static inline M mask_and(M a, M b) { return static_cast<M>(a & b); }
  static inline M mask_or(M a, M b) { return static_cast<M>(a | b); }
  static inline int count(M m) { return __builtin_popcount(static_cast<unsigned>(m)); }
  static inline uint32_t bits(M m) { return static_cast<uint32_t>(m); }
  static inline M from_bits(uint32_t b) { return static_cast<M>(b); }
  struct D {
    __m512d lo, hi;
  };
  static inline __m256 half_hi(R x) { return _mm256_castpd_ps(_mm512_extractf64x4_pd(_mm512_castps_pd(x), 1)); }
  static inline D dzero() { return D{_mm512_setzero_pd(), _mm512_setzero_pd()}; }
  static inline D dadd(D acc, R x) {
    return D{_mm512_add_pd(acc.lo, _mm512_cvtps_pd(_mm512_castps512_ps256(x))), _mm512_add_pd(acc.hi, _mm512_cvtps_pd(half_hi(x)))};
  }
  static inline double dsum(D acc) { return _mm512_reduce_add_pd(_mm512_add_pd(acc.lo, acc.hi)); }
};
#endif

}  // namespace DC_ISA
}  // namespace dist_cautious_cpu
