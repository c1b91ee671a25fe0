// See came_factors.h. Compiled with -ffp-contract=off (dist_cautious/kernels/build.py): the only
// fused multiply-add is the explicit std::fma of the EMA. The loops are built twice, for the
// baseline x86-64 target and for AVX2 + FMA (chosen at run time, as the kernel tables are): the
// baseline has no FMA instruction, so std::fma there is a call into libm per element. Both give
// the same bits (fma, division and square root are correctly rounded either way; -fno-math-errno
// lets the square roots vectorize). The double sums of the means stay in row order. One thread:
// the factor vectors hold rows + columns (about sqrt of the params), microseconds per step.
#include "came_factors.h"

#include <cmath>

namespace dist_cautious_cpu {

namespace {

__attribute__((always_inline)) inline void ema(float* state, const float* sums, const float* counts, int64_t n, float beta,
                                               float one_minus_beta) {
  for (int64_t i = 0; i < n; ++i) state[i] = std::fma(sums[i] / counts[i], one_minus_beta, state[i] * beta);
}

__attribute__((always_inline)) inline void update(const FactorSpans& s, float beta, float one_minus_beta) {
  ema(s.row_state, s.row_sums, s.row_counts, s.num_rows, beta, one_minus_beta);
  ema(s.col_state, s.col_sums, s.col_counts, s.num_cols, beta, one_minus_beta);
  int64_t row = 0, matrix = 0;
  for (int64_t run = 0; run < s.num_runs; ++run) {
    const int64_t R = s.run_rows_per_matrix[run];
    for (int64_t end = row + s.run_rows[run]; row < end; row += R, ++matrix) {
      double sum = 0.0;
      for (int64_t i = row; i < row + R; ++i) sum += s.row_state[i];
      const float mean = static_cast<float>(sum / static_cast<double>(R));
      s.means[matrix] = mean;
      for (int64_t i = row; i < row + R; ++i) s.row_factor[i] = 1.0f / std::sqrt(s.row_state[i] / mean);
    }
  }
  for (int64_t j = 0; j < s.num_cols; ++j) s.col_factor[j] = 1.0f / std::sqrt(s.col_state[j]);
}

void update_baseline(const FactorSpans& s, float beta, float one_minus_beta) { update(s, beta, one_minus_beta); }

#if defined(__x86_64__) && defined(__GNUC__)
__attribute__((target("avx2,fma"))) void update_avx2(const FactorSpans& s, float beta, float one_minus_beta) {
  update(s, beta, one_minus_beta);
}

bool has_avx2_fma() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma");
}
#endif

}  // namespace

void came_factor_update(const FactorSpans& spans, float beta, float one_minus_beta) {
#if defined(__x86_64__) && defined(__GNUC__)
  static const bool avx2 = has_avx2_fma();
  if (avx2) return update_avx2(spans, beta, one_minus_beta);
#endif
  update_baseline(spans, beta, one_minus_beta);
}

}  // namespace dist_cautious_cpu
