// CAME's factor math after a reduction of row / column sums (dist_cautious/kernels/reference.py,
// came_factor_update): plain C++ over the flat fp32 buffers of one segment, no torch types. The
// factor vectors are small (rows + columns of every matrix, about sqrt of the params), so one
// pass over them costs little; what this replaces is about ten torch ops per segment and phase.
#pragma once

#include <cstdint>

namespace dist_cautious_cpu {

struct FactorSpans {
  float* row_state;         // num_rows, updated in place
  float* col_state;         // num_cols, updated in place
  const float* row_sums;    // num_rows, this step's reduced sums
  const float* col_sums;    // num_cols
  const float* row_counts;  // num_rows: C of each row's matrix
  const float* col_counts;  // num_cols: R of each column's matrix
  float* row_factor;        // num_rows, written
  float* col_factor;        // num_cols, written
  float* means;             // one per matrix, written
  int64_t num_rows;
  int64_t num_cols;
  const int64_t* run_rows_per_matrix;  // per run: R
  const int64_t* run_rows;             // per run: rows in the run (whole matrices)
  int64_t num_runs;
};

// Torch's op sequence element for element: x = sums / counts; state = fma(x, 1 - beta, state * beta)
// (mul_ then add_ with alpha, which torch's CPU kernels run as one fused multiply-add); column
// factor 1 / sqrt(c) (torch's rsqrt). Each matrix's mean of its row state is summed in double in
// row order and rounded once (mean = fp32(sum / R)); torch sums in fp32 in its own order, so a
// mean may differ from torch's by that sum's rounding error (at most R * 2^-24 relative), and
// the row factor 1 / sqrt(r / mean) then follows torch's ops.
void came_factor_update(const FactorSpans& spans, float beta, float one_minus_beta);

}  // namespace dist_cautious_cpu
