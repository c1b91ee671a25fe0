// The fused optimizer kernels, written once over the SIMD traits of simd.h and instantiated per
// ISA (the including translation unit defines DC_ISA, the vector traits `V`, and the target
// pragma). Each kernel runs a vector loop and a scalar tail with the SAME element formula (a
// generic lambda called with `V` and with `Scalar`), so results never depend on where a tile
// or a vector boundary falls.
//
// The element formulas reproduce kernels/reference.py op by op (see simd.h for torch's op
// sequence): fp32 math, params/grads converted on load, params rounded to nearest even on store.
//
// Memory traffic per element (fp32 params and grads; a bf16/fp16 param or grad costs 2 bytes
// instead of 4 for each of its reads and writes) is stated on each kernel. The minimum for one
// AdamW step is 28 B (read p, g, m, v; write p, m, v); the cautious mask needs the whole tensor's
// count before any param can move, which costs one extra read of g and m (8 B).
#pragma once

#ifndef DC_ISA
#error "define DC_ISA before including kernels.h"
#endif

#include <algorithm>

#include "kernels_api.h"
#include "simd.h"

namespace dist_cautious_cpu {
namespace DC_ISA {

// for_each and count_each walk a long range as two interleaved halves, [lo, lo + h) and
// [lo + h, lo + 2h) in step, then the rest. Measured on one core here: a stream read (or read and
// written back) as two walks far apart moves 15-30% more bytes per second than the same stream
// walked once, because the core then keeps the misses of two prefetch streams in flight instead
// of one. Each element's formula is unchanged, so results do not depend on the split. Short
// ranges (a CAME row segment) are walked once: two walks a few KiB apart measured slower.
constexpr int64_t kMinSplit = 1 << 14;

// Half of [0, n) for the interleaved walk: a multiple of `unit` elements, 0 below kMinSplit. Not a
// multiple of 256 elements: two walks a multiple of 4 KiB apart would alias in the store buffer.
static inline int64_t split_half(int64_t n, int64_t unit) {
  if (n < kMinSplit) return 0;
  const int64_t h = n / (2 * unit) * unit;
  return h % 256 == 0 ? h - unit : h;
}

// Run body(traits, i) over [lo, hi): vector steps of V::W (the two halves, then the rest), then a
// scalar tail. Vector steps start at lo + a multiple of V::W.
template <class V, class F>
static inline void for_each(int64_t lo, int64_t hi, F&& body) {
  const int64_t h = split_half(hi - lo, V::W);
  for (int64_t i = lo; i < lo + h; i += V::W) {
    body(V{}, i);
    body(V{}, i + h);
  }
  int64_t i = lo + 2 * h;
  for (; i + V::W <= hi; i += V::W) body(V{}, i);
  for (; i < hi; ++i) body(Scalar{}, i);
}

// Sum over [lo, hi) of body(traits, i) (an fp32 vector). Lanes accumulate in fp32 for at most
// kLaneRun steps, then flush into a double accumulator: each lane's fp32 partial carries a
// relative error of at most kLaneRun * 2^-24 (the bound tests/kernels states), and the converts
// to double cost once per kLaneRun vectors instead of once per vector.
constexpr int64_t kLaneRun = 64;

template <class V, class F>
static inline double sum_each(int64_t lo, int64_t hi, F&& body) {
  typename V::D acc = V::dzero();
  int64_t i = lo;
  while (i + V::W <= hi) {
    const int64_t stop = std::min(hi - V::W, i + (kLaneRun - 1) * V::W);
    typename V::R part = body(V{}, i);
    for (i += V::W; i <= stop; i += V::W) part = V::add(part, body(V{}, i));
    acc = V::dadd(acc, part);
  }
  double tail = 0.0;
  for (; i < hi; ++i) tail += static_cast<double>(body(Scalar{}, i));
  return V::dsum(acc) + tail;
}

// Count over [lo, hi) of the lanes where body(traits, i) (a mask) is set. SPLIT: the two
// interleaved halves of for_each, for bodies whose element order does not matter.
template <class V, bool SPLIT = true, class F>
static inline int64_t count_each(int64_t lo, int64_t hi, F&& body) {
  int64_t count = 0;
  const int64_t h = SPLIT ? split_half(hi - lo, V::W) : 0;
  for (int64_t i = lo; i < lo + h; i += V::W) count += V::count(body(V{}, i)) + V::count(body(V{}, i + h));
  int64_t i = lo + 2 * h;
  for (; i + V::W <= hi; i += V::W) count += V::count(body(V{}, i));
  for (; i < hi; ++i) count += Scalar::count(body(Scalar{}, i));
  return count;
}

template <class T>
static inline typename T::R lerp(typename T::R a, typename T::R b, Lerp w) {
  // torch.lerp: fma(w, b - a, a) for |w| < 0.5, else fma(w - 1, b - a, b)
  return T::fma(T::set1(w.coeff), T::sub(b, a), w.small ? a : b);
}

template <class T>
static inline typename T::R sign(typename T::R x) {
  return T::select(T::gt0(x), T::set1(1.0f), T::select(T::lt0(x), T::set1(-1.0f), T::set1(0.0f)));
}

// x * (phi ? scale : 0): the cautious mask as the reference multiplies it (keeps -0 / +0 exact).
template <class T>
static inline typename T::R masked(typename T::R x, typename T::M phi, float scale) {
  return T::mul(x, T::select(phi, T::set1(scale), T::set1(0.0f)));
}

// sign(c) * g > 0, without forming sign(c) * g: sign(c) is +-1 or 0, so the product is exactly
// +-g or +-0 and is positive iff c and g are both > 0 or both < 0 (NaN compares false either way).
template <class T>
static inline typename T::M same_sign(typename T::R c, typename T::R g) {
  return T::mask_or(T::mask_and(T::gt0(c), T::gt0(g)), T::mask_and(T::lt0(c), T::lt0(g)));
}

template <class T, class PT>
static inline void store_param(PT* p, int64_t i, typename T::R x) {
  T::store(p + i, x);
}

// ---------------------------------------------------------------- AdamW ----------------------
// Mask count: read g, m (8 B/element), no writes.
template <class V, class GT>
static int64_t adamw_count_t(const GT* g, const float* m, int64_t lo, int64_t hi, Lerp w) {
  return count_each<V>(lo, hi, [&](auto t, int64_t i) {
    using T = decltype(t);
    auto gf = T::load(g + i);
    auto m1 = lerp<T>(T::load(m + i), gf, w);
    return T::gt0(T::mul(m1, gf));
  });
}

// Fused step: read p, g, m, v; write p, m, v (28 B/element fp32; 20 B with bf16 p and g).
template <class V, class PT, class GT>
static void adamw_apply_t(PT* p, const GT* g, float* m, float* v, int64_t lo, int64_t hi, const AdamParams& a) {
  for_each<V>(lo, hi, [&](auto t, int64_t i) {
    using T = decltype(t);
    auto gf = T::load(g + i);
    auto pf = T::mul(T::load(p + i), T::set1(a.decay));
    auto m1 = lerp<T>(T::load(m + i), gf, a.m);
    auto v1 = T::fma(T::mul(T::set1(a.one_minus_beta2), gf), gf, T::mul(T::load(v + i), T::set1(a.beta2)));
    // torch: (sqrt(v) / sqrt(bc2)) + eps, a true division (not a reciprocal multiply): the
    // divider has room, the step is memory-bound on 2+ cores (see docs/cpu_kernels.md)
    auto den = T::add(T::div(T::sqrt(v1), T::set1(a.sqrt_bc2)), T::set1(a.eps));
    auto num = a.cautious ? masked<T>(m1, T::gt0(T::mul(m1, gf)), a.scale) : m1;
    T::store(m + i, m1);
    T::store(v + i, v1);
    store_param<T>(p, i, T::add(pf, T::div(T::mul(T::set1(a.neg_step_size), num), den)));
  });
}

// ---------------------------------------------------------------- Lion -----------------------
// Mask count: read g, m (8 B/element), no writes.
template <class V, class GT>
static int64_t lion_count_t(const GT* g, const float* m, int64_t lo, int64_t hi, Lerp w) {
  return count_each<V>(lo, hi, [&](auto t, int64_t i) {
    using T = decltype(t);
    auto gf = T::load(g + i);
    return same_sign<T>(lerp<T>(T::load(m + i), gf, w), gf);
  });
}

// Fused step: read p, g, m; write p, m (20 B/element fp32).
template <class V, class PT, class GT>
static void lion_apply_t(PT* p, const GT* g, float* m, int64_t lo, int64_t hi, const LionParams& a) {
  for_each<V>(lo, hi, [&](auto t, int64_t i) {
    using T = decltype(t);
    auto gf = T::load(g + i);
    auto mo = T::load(m + i);
    auto pf = T::mul(T::load(p + i), T::set1(a.decay));
    auto c = lerp<T>(mo, gf, a.update);
    auto u = sign<T>(c);
    if (a.cautious) u = masked<T>(u, same_sign<T>(c, gf), a.scale);
    T::store(m + i, lerp<T>(mo, gf, a.m));
    store_param<T>(p, i, T::fma(u, T::set1(a.neg_lr), pf));
  });
}

// Cautious Lion split at the mask reduction. Count + fused step cost 8 + 20 = 28 B/element; this
// split costs 12.25 + 8.25 = 20.5 B (DeepSpeedCPULion: 20): the first pass, which must read g and
// m anyway, also moves the momentum and keeps what the second pass needs, the masked update
// sign(c) * (phi ? scale : 0) up to its scale, in 2 bits per element.
//
// Code layout: elements 8k..8k+7 own bytes 2k (bit j: element 8k+j's update is non-zero, i.e.
// phi) and 2k+1 (bit j: its sign bit is set, i.e. c < 0, which also gives the -0 of a masked
// negative entry). Vector steps start at multiples of 8 (tiles are multiples of 8), so a vector
// writes whole byte pairs and only the scalar tail of the last group sets single bits.
constexpr int64_t kCodeGroup = 8;

template <class T>
static inline void store_code(uint8_t* code, int64_t i, typename T::M nonzero, typename T::M negative) {
  uint8_t* pair = code + 2 * (i / kCodeGroup);
  if constexpr (T::W == 1) {
    const uint8_t bit = static_cast<uint8_t>(1u << (i % kCodeGroup));
    pair[0] = nonzero ? (pair[0] | bit) : (pair[0] & ~bit);
    pair[1] = negative ? (pair[1] | bit) : (pair[1] & ~bit);
  } else {
    const uint32_t nz = T::bits(nonzero), neg = T::bits(negative);
    for (int k = 0; k < T::W / kCodeGroup; ++k) {
      pair[2 * k] = static_cast<uint8_t>(nz >> (8 * k));
      pair[2 * k + 1] = static_cast<uint8_t>(neg >> (8 * k));
    }
  }
}

// The lane bits of byte `which` (0: non-zero, 1: negative) of the code pairs covering i..i+W-1.
template <class T>
static inline typename T::M load_code(const uint8_t* code, int64_t i, int which) {
  const uint8_t* pair = code + 2 * (i / kCodeGroup);
  if constexpr (T::W == 1) {
    return T::from_bits(static_cast<uint32_t>(pair[which] >> (i % kCodeGroup)));
  } else {
    uint32_t b = 0;
    for (int k = 0; k < T::W / kCodeGroup; ++k) b |= static_cast<uint32_t>(pair[2 * k + which]) << (8 * k);
    return T::from_bits(b);
  }
}

// Phase 1: c = lerp(m, g, 1 - beta1); code <- (phi = sign(c) g > 0, c < 0); m = lerp(m, g,
// 1 - beta2); returns the count of phi. Read g, m; write m and the code (12.25 B/element).
template <class V, class GT>
static int64_t lion_encode_t(const GT* g, float* m, uint8_t* code, int64_t lo, int64_t hi, Lerp update, Lerp mw) {
  return count_each<V>(lo, hi, [&](auto t, int64_t i) {
    using T = decltype(t);
    auto gf = T::load(g + i);
    auto mo = T::load(m + i);
    auto c = lerp<T>(mo, gf, update);
    auto phi = same_sign<T>(c, gf);
    store_code<T>(code, i, phi, T::lt0(c));
    T::store(m + i, lerp<T>(mo, gf, mw));
    return phi;
  });
}

// Phase 2: u = (c < 0 ? -1 : 1) * (phi ? scale : 0), which is sign(c) * (phi ? scale : 0) bit
// for bit (c = 0 or NaN has phi false and gives +0, as sign(c) = 0 does);
// p = fma(u, -lr, p (1 - lr wd)). Read p and the code, write p (8.25 B/element fp32).
template <class V, class PT>
static void lion_decode_apply_t(PT* p, const uint8_t* code, int64_t lo, int64_t hi, float decay, float neg_lr, float scale) {
  for_each<V>(lo, hi, [&](auto t, int64_t i) {
    using T = decltype(t);
    auto sign = T::select(load_code<T>(code, i, 1), T::set1(-1.0f), T::set1(1.0f));
    auto u = T::mul(sign, T::select(load_code<T>(code, i, 0), T::set1(scale), T::set1(0.0f)));
    auto pf = T::mul(T::load(p + i), T::set1(decay));
    store_param<T>(p, i, T::fma(u, T::set1(neg_lr), pf));
  });
}

// ---------------------------------------------------------------- CAME -----------------------
// Phase 1, factored: q = g^2 + eps1 summed into the row (returned) and the columns (col_acc,
// fp32 over a run of rows). Read g (4 B/element); the column accumulator stays in cache.
template <class V, class GT>
static double came_sq_segment_t(const GT* g, int64_t off, int64_t len, float eps1, float* col_acc) {
  return sum_each<V>(0, len, [&](auto t, int64_t j) {
    using T = decltype(t);
    auto gf = T::load(g + off + j);
    auto q = T::add(T::mul(gf, gf), T::set1(eps1));
    T::store(col_acc + j, T::add(T::load(col_acc + j), q));
    return q;
  });
}

// Phase 1, factored, whole rows only: col_acc += g^2 * a with a = 1 / R_i, R_i the row's updated
// second moment. Summed over rows, this folds phase 2's sum of squares into phase 1:
// sum_ij (r_i c_j g_ij)^2 = mean(R) sum_j c_j^2 sum_i g_ij^2 / R_i, r_i^2 = mean(R) / R_i. The
// dispatcher calls it right after the row's own sum, so g is read from cache (no memory traffic).
template <class V, class GT>
static void came_fold_segment_t(const GT* g, int64_t off, int64_t len, float a, float* col_acc) {
  for_each<V>(0, len, [&](auto t, int64_t j) {
    using T = decltype(t);
    auto gf = T::load(g + off + j);
    T::store(col_acc + j, T::fma(T::mul(gf, gf), T::set1(a), T::load(col_acc + j)));
  });
}

// Phase 1, factored, K consecutive whole rows of `len` elements (the first at local offset `off`)
// walked in step: came_sq_segment for each row, as K read streams instead of one (one core reads
// a single stream at about half the rate of four). Each row's sum (sums[k]) is formed exactly as
// came_sq_segment forms it, and each column receives its rows' q in row order, so the results are
// bit for bit those of K came_sq_segment calls. FOLD: the same walk also does came_fold_segment
// for the previous group's kCameSqRows rows (at fold_off, weights fold_a, into fold_acc, row by
// row): they are still in cache, and their arithmetic then overlaps this group's loads instead of
// leaving the memory idle between rows.
template <class V, int K, bool FOLD, class GT>
static void came_sq_rows_t(const GT* g, int64_t off, int64_t len, float eps1, float* col_acc, double* sums, int64_t fold_off,
                           const float* fold_a, float* fold_acc) {
  const GT* rows = g + off;
  const GT* folded = g + fold_off;
  auto column = [&](auto t, int64_t j, auto&& take) {
    using T = decltype(t);
    auto c = T::load(col_acc + j);
    for (int k = 0; k < K; ++k) {
      auto gf = T::load(rows + k * len + j);
      auto q = T::add(T::mul(gf, gf), T::set1(eps1));
      c = T::add(c, q);
      take(k, q);
    }
    T::store(col_acc + j, c);
    if constexpr (FOLD) {
      auto f = T::load(fold_acc + j);
      for (int k = 0; k < kCameSqRows; ++k) {
        auto gf = T::load(folded + k * len + j);
        f = T::fma(T::mul(gf, gf), T::set1(fold_a[k]), f);
      }
      T::store(fold_acc + j, f);
    }
  };
  // sum_each's order for every row: fp32 lanes over runs of kLaneRun vectors, then double
  using R = typename V::R;
  typename V::D acc[K];
  R part[K];
  for (int k = 0; k < K; ++k) acc[k] = V::dzero();
  int64_t j = 0;
  while (j + V::W <= len) {
    const int64_t stop = std::min(len - V::W, j + (kLaneRun - 1) * V::W);
    column(V{}, j, [&](int k, R q) { part[k] = q; });
    for (j += V::W; j <= stop; j += V::W) column(V{}, j, [&](int k, R q) { part[k] = V::add(part[k], q); });
    for (int k = 0; k < K; ++k) acc[k] = V::dadd(acc[k], part[k]);
  }
  double tail[K] = {};
  for (; j < len; ++j) column(Scalar{}, j, [&](int k, float q) { tail[k] += static_cast<double>(q); });
  for (int k = 0; k < K; ++k) sums[k] = V::dsum(acc[k]) + tail[k];
}

// came_sq_rows for any group: the fused walk for a full group folding a full group, otherwise
// the previous group's folds first, then the rows (the same order, so the same bits).
template <class V, class GT>
static void came_sq_rows_any(const GT* g, int64_t off, int64_t len, int rows, float eps1, float* col_acc, double* sums, int64_t fold_off,
                             int fold_rows, const float* fold_a, float* fold_acc) {
  if (rows == kCameSqRows && fold_rows == kCameSqRows) {
    came_sq_rows_t<V, kCameSqRows, true>(g, off, len, eps1, col_acc, sums, fold_off, fold_a, fold_acc);
    return;
  }
  for (int k = 0; k < fold_rows; ++k) came_fold_segment_t<V>(g, fold_off + k * len, len, fold_a[k], fold_acc);
  switch (rows) {
    case 1: return came_sq_rows_t<V, 1, false>(g, off, len, eps1, col_acc, sums, 0, nullptr, nullptr);
    case 2: return came_sq_rows_t<V, 2, false>(g, off, len, eps1, col_acc, sums, 0, nullptr, nullptr);
    case 3: return came_sq_rows_t<V, 3, false>(g, off, len, eps1, col_acc, sums, 0, nullptr, nullptr);
    default: return came_sq_rows_t<V, kCameSqRows, false>(g, off, len, eps1, col_acc, sums, 0, nullptr, nullptr);
  }
}

// Phase 1, 1-D / 0-D: v = beta2 v + (1 - beta2)(g^2 + eps1). Read g, v; write v (12 B/element).
template <class V, class GT>
static void came_vector_moment_t(const GT* g, float* v, int64_t lo, int64_t hi, float beta2, float one_minus_beta2, float eps1) {
  for_each<V>(lo, hi, [&](auto t, int64_t i) {
    using T = decltype(t);
    auto gf = T::load(g + i);
    auto q = T::add(T::mul(gf, gf), T::set1(eps1));
    T::store(v + i, T::fma(q, T::set1(one_minus_beta2), T::mul(T::load(v + i), T::set1(beta2))));
  });
}

// Phase 2, factored: sum of uh^2, uh = (row * col) * g. Read g (4 B/element; the column
// factors are O(C) and cached).
template <class V, class GT>
static double came_sumsq_segment_t(const GT* g, int64_t off, int64_t len, float rowf, const float* colf) {
  return sum_each<V>(0, len, [&](auto t, int64_t j) {
    using T = decltype(t);
    auto uh = T::mul(T::mul(T::set1(rowf), T::load(colf + j)), T::load(g + off + j));
    return T::mul(uh, uh);
  });
}

template <class T>
static inline typename T::R rsqrt_times(const float* v, int64_t i, typename T::R x) {
  // reference: v.rsqrt().mul_(x), torch's rsqrt being 1 / sqrt(v)
  return v == nullptr ? x : T::mul(T::div(T::set1(1.0f), T::sqrt(T::load(v + i))), x);
}

// Phase 2, 1-D / 0-D: sum of uh^2, uh = rsqrt(v) * g. Read g, v (8 B/element).
template <class V, class GT>
static double came_sumsq_elem_t(const GT* g, const float* v, int64_t lo, int64_t hi) {
  return sum_each<V>(lo, hi, [&](auto t, int64_t i) {
    using T = decltype(t);
    auto uh = rsqrt_times<T>(v, i, T::load(g + i));
    return T::mul(uh, uh);
  });
}

// Phase 3, factored: uh = (row * col) * g / clip; m = beta1 m + (1 - beta1) uh; residual
// (uh - m)^2 + eps2 into row (returned) and column (col_acc) sums; count m * g > 0.
// Read g, m; write m (12 B/element).
// KEEP: also write the mask into `bits` (a register copy during the loop: through the pointer,
// every vector would load and store the accumulator).
template <class V, bool KEEP, class GT>
static double came_momentum_segment_t(const GT* g, float* m, int64_t off, int64_t len, float rowf, const float* colf,
                                      const CameMomentumParams& params, float* col_acc, int64_t* count, MaskBits* bits) {
  const CameMomentumParams a = params;  // a local copy: the stores through m and col_acc cannot change it
  int64_t agree = 0;
  MaskBits kept;
  if constexpr (KEEP) kept = *bits;
  const bool aligned = off % V::W == 0;  // vectors never straddle a mask word
  double row = sum_each<V>(0, len, [&](auto t, int64_t j) {
    using T = decltype(t);
    auto gf = T::load(g + off + j);
    auto uh = T::div(T::mul(T::mul(T::set1(rowf), T::load(colf + j)), gf), T::set1(a.clip));
    auto m1 = T::fma(uh, T::set1(a.one_minus_beta1), T::mul(T::load(m + off + j), T::set1(a.beta1)));
    T::store(m + off + j, m1);
    auto d = T::sub(uh, m1);
    auto res = T::add(T::mul(d, d), T::set1(a.eps2));
    T::store(col_acc + j, T::add(T::load(col_acc + j), res));
    auto phi = T::gt0(T::mul(m1, gf));
    agree += T::count(phi);
    if constexpr (KEEP) {
      if (aligned) {
        kept.put_aligned(off + j, T::bits(phi), T::W);
      } else {
        kept.put(off + j, T::bits(phi), T::W);
      }
    }
    return res;
  });
  if constexpr (KEEP) *bits = kept;
  *count += agree;
  return row;
}

// Phase 3, 1-D / 0-D: uh = rsqrt(v) * g / clip; m update; count m * g > 0 (and keep it in `bits`).
// Read g, v, m; write m (16 B/element).
template <class V, bool KEEP, class GT>
static int64_t came_momentum_elem_t(const GT* g, float* m, const float* v, int64_t lo, int64_t hi, const CameMomentumParams& a,
                                    MaskBits* bits) {
  MaskBits kept;
  if constexpr (KEEP) kept = *bits;
  // one walk: MaskBits gathers the bits of consecutive elements
  const int64_t agree = count_each<V, false>(lo, hi, [&](auto t, int64_t i) {
    using T = decltype(t);
    auto gf = T::load(g + i);
    auto uh = T::div(rsqrt_times<T>(v, i, gf), T::set1(a.clip));
    auto m1 = T::fma(uh, T::set1(a.one_minus_beta1), T::mul(T::load(m + i), T::set1(a.beta1)));
    T::store(m + i, m1);
    auto phi = T::gt0(T::mul(m1, gf));
    if constexpr (KEEP) kept.put(i, T::bits(phi), T::W);
    return phi;
  });
  if constexpr (KEEP) *bits = kept;
  return agree;
}

// The cautious mask of element i..: from the momentum pass's bits when kept, else m * g > 0.
template <class T, class GT>
static inline typename T::M came_mask(const uint8_t* mask, const GT* g, int64_t i, typename T::R mf) {
  return mask != nullptr ? T::from_bits(mask_bits_at(mask, i, T::W)) : T::gt0(T::mul(mf, T::load(g + i)));
}

// Phase 4, factored, the new param at element e: u = (row * col) * m, masked where m * g <= 0;
// p (1 - lr wd) - lr u. `colf` points at e's column factor.
template <class T, class PT, class GT>
static inline typename T::R came_apply_at(const PT* p, const GT* g, const float* m, int64_t e, float rowf, const float* colf,
                                          const CameApplyParams& a, const uint8_t* mask) {
  auto mf = T::load(m + e);
  auto u = T::mul(T::mul(T::set1(rowf), T::load(colf)), mf);
  if (a.cautious) u = masked<T>(u, came_mask<T>(mask, g, e, mf), a.scale);
  auto pf = T::mul(T::load(p + e), T::set1(a.decay));
  return T::fma(u, T::set1(a.neg_lr), pf);
}

// Phase 4, factored, over one row segment. Read p, m (+ the mask bits, or g, when cautious); write
// p (12 B/element; 12.125 B cautious with the bits, 16 B reading g).
template <class V, class PT, class GT>
static void came_apply_segment_t(PT* p, const GT* g, const float* m, int64_t off, int64_t len, float rowf, const float* colf,
                                 const CameApplyParams& params, const uint8_t* mask) {
  const CameApplyParams a = params;  // a local copy: the param stores cannot change it
  for_each<V>(0, len, [&](auto t, int64_t j) {
    using T = decltype(t);
    store_param<T>(p, off + j, came_apply_at<T>(p, g, m, off + j, rowf, colf + j, a, mask));
  });
}

// came_apply_segment over two segments of one length in step (off[k], rowf[k], colf[k]): the two
// halves of a tile, walked as for_each walks a long range (two prefetch streams). Both loads
// before either store, so that two halves a multiple of 4 KiB apart do not alias.
template <class V, class PT, class GT>
static void came_apply_pair_t(PT* p, const GT* g, const float* m, const int64_t* off, int64_t len, const float* rowf,
                              const float* const* colf, const CameApplyParams& params, const uint8_t* mask) {
  const CameApplyParams a = params;  // a local copy: the param stores cannot change it
  for_each<V>(0, len, [&](auto t, int64_t j) {
    using T = decltype(t);
    auto first = came_apply_at<T>(p, g, m, off[0] + j, rowf[0], colf[0] + j, a, mask);
    auto second = came_apply_at<T>(p, g, m, off[1] + j, rowf[1], colf[1] + j, a, mask);
    store_param<T>(p, off[0] + j, first);
    store_param<T>(p, off[1] + j, second);
  });
}

// Phase 4, 1-D / 0-D: u = m (or rsqrt(v) * m), same mask and update. 12 B/element (cautious:
// 12.125 with the bits, 16 reading g).
template <class V, class PT, class GT>
static void came_apply_elem_t(PT* p, const GT* g, const float* m, const float* v, int64_t lo, int64_t hi, const CameApplyParams& a,
                              const uint8_t* mask) {
  for_each<V>(lo, hi, [&](auto t, int64_t i) {
    using T = decltype(t);
    auto mf = T::load(m + i);
    auto u = rsqrt_times<T>(v, i, mf);
    if (a.cautious) u = masked<T>(u, came_mask<T>(mask, g, i, mf), a.scale);
    auto pf = T::mul(T::load(p + i), T::set1(a.decay));
    store_param<T>(p, i, T::fma(u, T::set1(a.neg_lr), pf));
  });
}

// ---------------------------------------------------------------- dtype dispatch -------------
template <class F>
static inline auto with_dtype(int code, const void* ptr, F&& f) {
  switch (code) {
    case kBF16: return f(static_cast<const bf16*>(ptr));
    case kF16: return f(static_cast<const fp16*>(ptr));
    default: return f(static_cast<const float*>(ptr));
  }
}

template <class F>
static inline auto with_mut_dtype(int code, void* ptr, F&& f) {
  switch (code) {
    case kBF16: return f(static_cast<bf16*>(ptr));
    case kF16: return f(static_cast<fp16*>(ptr));
    default: return f(static_cast<float*>(ptr));
  }
}

template <class V>
struct Entry {
  static constexpr int W = V::W;
  static int64_t adamw_count(const void* g, int gt, const float* m, int64_t lo, int64_t hi, Lerp w) {
    return with_dtype(gt, g, [&](auto gp) { return adamw_count_t<V>(gp, m, lo, hi, w); });
  }
  static void adamw_apply(void* p, int pt, const void* g, int gt, float* m, float* v, int64_t lo, int64_t hi, const AdamParams& a) {
    with_mut_dtype(pt, p, [&](auto pp) { with_dtype(gt, g, [&](auto gp) { adamw_apply_t<V>(pp, gp, m, v, lo, hi, a); }); });
  }
  static int64_t lion_count(const void* g, int gt, const float* m, int64_t lo, int64_t hi, Lerp w) {
    return with_dtype(gt, g, [&](auto gp) { return lion_count_t<V>(gp, m, lo, hi, w); });
  }
  static void lion_apply(void* p, int pt, const void* g, int gt, float* m, int64_t lo, int64_t hi, const LionParams& a) {
    with_mut_dtype(pt, p, [&](auto pp) { with_dtype(gt, g, [&](auto gp) { lion_apply_t<V>(pp, gp, m, lo, hi, a); }); });
  }
  static int64_t lion_encode(const void* g, int gt, float* m, uint8_t* code, int64_t lo, int64_t hi, Lerp update, Lerp mw) {
    return with_dtype(gt, g, [&](auto gp) { return lion_encode_t<V>(gp, m, code, lo, hi, update, mw); });
  }
  static void lion_decode_apply(void* p, int pt, const uint8_t* code, int64_t lo, int64_t hi, float decay, float neg_lr, float scale) {
    with_mut_dtype(pt, p, [&](auto pp) { lion_decode_apply_t<V>(pp, code, lo, hi, decay, neg_lr, scale); });
  }
  static double came_sq_segment(const void* g, int gt, int64_t off, int64_t len, float eps1, float* col_acc) {
    return with_dtype(gt, g, [&](auto gp) { return came_sq_segment_t<V>(gp, off, len, eps1, col_acc); });
  }
  static void came_fold_segment(const void* g, int gt, int64_t off, int64_t len, float a, float* col_acc) {
    with_dtype(gt, g, [&](auto gp) { came_fold_segment_t<V>(gp, off, len, a, col_acc); });
  }
  static void came_sq_rows(const void* g, int gt, int64_t off, int64_t len, int rows, float eps1, float* col_acc, double* sums,
                           int64_t fold_off, int fold_rows, const float* fold_a, float* fold_acc) {
    with_dtype(gt, g, [&](auto gp) { came_sq_rows_any<V>(gp, off, len, rows, eps1, col_acc, sums, fold_off, fold_rows, fold_a, fold_acc); });
  }
  static void came_vector_moment(const void* g, int gt, float* v, int64_t lo, int64_t hi, float b2, float omb2, float eps1) {
    with_dtype(gt, g, [&](auto gp) { came_vector_moment_t<V>(gp, v, lo, hi, b2, omb2, eps1); });
  }
  static double came_sumsq_segment(const void* g, int gt, int64_t off, int64_t len, float rowf, const float* colf) {
    return with_dtype(gt, g, [&](auto gp) { return came_sumsq_segment_t<V>(gp, off, len, rowf, colf); });
  }
  static double came_sumsq_elem(const void* g, int gt, const float* v, int64_t lo, int64_t hi) {
    return with_dtype(gt, g, [&](auto gp) { return came_sumsq_elem_t<V>(gp, v, lo, hi); });
  }
  static double came_momentum_segment(const void* g, int gt, float* m, int64_t off, int64_t len, float rowf, const float* colf,
                                      const CameMomentumParams& a, float* col_acc, int64_t* count, MaskBits* bits) {
    return with_dtype(gt, g, [&](auto gp) {
      return bits != nullptr ? came_momentum_segment_t<V, true>(gp, m, off, len, rowf, colf, a, col_acc, count, bits)
                             : came_momentum_segment_t<V, false>(gp, m, off, len, rowf, colf, a, col_acc, count, bits);
    });
  }
  static int64_t came_momentum_elem(const void* g, int gt, float* m, const float* v, int64_t lo, int64_t hi, const CameMomentumParams& a,
                                    MaskBits* bits) {
    return with_dtype(gt, g, [&](auto gp) {
      return bits != nullptr ? came_momentum_elem_t<V, true>(gp, m, v, lo, hi, a, bits) : came_momentum_elem_t<V, false>(gp, m, v, lo, hi, a, bits);
    });
  }
  static void came_apply_segment(void* p, int pt, const void* g, int gt, const float* m, int64_t off, int64_t len, float rowf,
                                 const float* colf, const CameApplyParams& a, const uint8_t* mask) {
    with_mut_dtype(pt, p, [&](auto pp) { with_dtype(gt, g, [&](auto gp) { came_apply_segment_t<V>(pp, gp, m, off, len, rowf, colf, a, mask); }); });
  }
  static void came_apply_pair(void* p, int pt, const void* g, int gt, const float* m, const int64_t* off, int64_t len, const float* rowf,
                              const float* const* colf, const CameApplyParams& a, const uint8_t* mask) {
    with_mut_dtype(pt, p, [&](auto pp) { with_dtype(gt, g, [&](auto gp) { came_apply_pair_t<V>(pp, gp, m, off, len, rowf, colf, a, mask); }); });
  }
  static void came_apply_elem(void* p, int pt, const void* g, int gt, const float* m, const float* v, int64_t lo, int64_t hi,
                              const CameApplyParams& a, const uint8_t* mask) {
    with_mut_dtype(pt, p, [&](auto pp) { with_dtype(gt, g, [&](auto gp) { came_apply_elem_t<V>(pp, gp, m, v, lo, hi, a, mask); }); });
  }
};

}  // namespace DC_ISA
}  // namespace dist_cautious_cpu

// A KernelTable of Entry<V>'s functions: constant-initialised (no code of the target ISA runs
// when the library loads, so importing on an older CPU is safe).
#define DIST_CAUTIOUS_KERNEL_TABLE(E, NAME)                                                         \
  KernelTable{NAME,                 E::W,                  &E::adamw_count,          &E::adamw_apply, \
              &E::lion_count,       &E::lion_apply,        &E::lion_encode,          &E::lion_decode_apply, \
              &E::came_sq_segment,      &E::came_fold_segment,  &E::came_sq_rows,           &E::came_vector_moment, \
              &E::came_sumsq_segment, &E::came_sumsq_elem, &E::came_momentum_segment, &E::came_momentum_elem, \
              &E::came_apply_segment, &E::came_apply_pair, &E::came_apply_elem}
