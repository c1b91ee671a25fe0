// See came_factors.h. Compiled with -ffp-contract=off (dist_cautious/kernels/build.py): the only
// fused multiply-add is the explicit std::fma of the EMA.
#include "came_factors.h"

#include <cmath>

namespace dist_cautious_cpu {

namespace {

// Elementwise loops go parallel from this many elements on (a large model's factor vectors hold
// millions); each element's result does not depend on the split.
constexpr int64_t kParallelFrom = 1 << 16;

void ema(float* state, const float* sums, const float* counts, int64_t n, float beta, float one_minus_beta, int threads) {
#pragma omp parallel for schedule(static) num_threads(threads) if (n >= kParallelFrom)
  for (int64_t i = 0; i < n; ++i) state[i] = std::fma(sums[i] / counts[i], one_minus_beta, state[i] * beta);
}

}  // namespace

void came_factor_update(const FactorSpans& s, float beta, float one_minus_beta) {
  ema(s.row_state, s.row_sums, s.row_counts, s.num_rows, beta, one_minus_beta, s.threads);
  ema(s.col_state, s.col_sums, s.col_counts, s.num_cols, beta, one_minus_beta, s.threads);
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
#pragma omp parallel for schedule(static) num_threads(s.threads) if (s.num_cols >= kParallelFrom)
  for (int64_t j = 0; j < s.num_cols; ++j) s.col_factor[j] = 1.0f / std::sqrt(s.col_state[j]);
}

}  // namespace dist_cautious_cpu
