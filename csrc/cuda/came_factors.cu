// CAME's factor math after a reduction of row / column sums (dist_cautious/kernels/reference.py,
// came_factor_update), over one segment's flat fp32 buffers in ONE launch: what the torch ops do
// in about ten launches per segment and phase. The vectors are small (rows + columns of every
// matrix), so the work is latency, not bandwidth: the point is the launch count.
//
// Work split (block-uniform, so each block takes one branch):
//   * blocks [0, block_units): one matrix of R > kFactorWarpRows rows each. The block's threads
//     update the rows' EMA, sum the new values in float64, and after the block reduction write
//     the mean and the row factors (each thread rereads only rows it wrote itself);
//   * the next warp_blocks blocks: one warp task per warp, 32 / g matrices of R <= 32 rows, g =
//     next_pow2(R) lanes each (a conv's (out, in, kh, kw) weight is out * in matrices of kh rows:
//     a block per matrix would be mostly idle threads);
//   * the rest: the columns, grid-stride (EMA and rsqrtf, no reduction).
//
// The mean of each matrix is a fixed function of R and the row values, whatever the block size
// and whichever of the two paths handles the matrix: row i is added in increasing order into
// leaf i % kLeaves (float64), then the kLeaves leaves are added in pairs of neighbours, level by
// level (strides 1, 2, 4, ...: a warp's xor butterfly for the first five levels, one warp over
// the 32 partial sums for the last five). A warp task's matrix has at most 32 non-zero leaves;
// the levels it skips add +0.0, which leaves a sum unchanged. No atomics: a run repeats bit for
// bit, and the CPU-emulated build (64 threads per block) computes the same sums as the GPU build.
//
// Rounding as torch's CUDA ops (see dc_kernels.h): sums.div_(counts) is an IEEE division;
// state.mul_(beta).add_(x, alpha=1-beta) rounds the product, then one fused multiply-add (as
// launch_came_vector_second_moment); torch.div(state, mean) is an IEEE division; torch.rsqrt on
// a CUDA float tensor is ::rsqrt(float), i.e. rsqrtf (ATen's rsqrt_kernel_cuda, built without
// --use_fast_math, as this file), so the factors match torch's bit for bit on the same GPU.

#include "dc_device.cuh"

namespace dist_cautious {
namespace {

constexpr int kLeaves = 1024;                // the fixed order's leaves (32 x 32)
constexpr int kPerThread = kLeaves / kThreads;  // leaves per thread on the block path
constexpr int kWarps = kThreads / 32;
static_assert(kLeaves % kThreads == 0 && kLeaves / 32 == 32, "kLeaves: 32 warps' worth of leaves, a multiple of kThreads");
// Column blocks: enough to fill an H100/H200 (132 SMs, 8 blocks of 256 threads each) and
// grid-stride beyond.
constexpr int64_t kMaxColumnBlocks = 1024;

struct FactorArgs {
  FactorSpans s;
  const FactorRun* runs;
  int num_runs;
  int block_runs;
  int64_t block_units;
  int64_t warp_units;
  int64_t warp_blocks;
  int64_t column_blocks;
  float beta, one_minus_beta;
};

// torch: state.mul_(beta).add_(sums / counts, alpha=1 - beta)
__device__ __forceinline__ float ema(float state, float sum, float count, float beta, float one_minus_beta) {
  return __fmaf_rn(one_minus_beta, __fdiv_rn(sum, count), __fmul_rn(state, beta));
}

// The last run in [lo, hi) whose first_unit <= unit (the table holds no empty runs).
__device__ __forceinline__ int find_run(const FactorRun* runs, int lo, int hi, int64_t unit) {
  hi -= 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (runs[mid].first_unit <= unit) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Sum over aligned groups of `width` lanes (a power of two <= 32), neighbours first; every lane
// of the group ends with the same value (floating-point addition commutes). All lanes call it.
__device__ __forceinline__ double group_sum(double value, int width) {
  for (int stride = 1; stride < width; stride <<= 1) value += __shfl_xor_sync(0xffffffffu, value, stride);
  return value;
}

// One matrix of R > kFactorWarpRows rows per block.
__device__ void block_matrix(const FactorArgs& a, int64_t unit) {
  const FactorRun run = a.runs[find_run(a.runs, 0, a.block_runs, unit)];
  const int64_t R = run.rows_per_matrix;
  const int64_t matrix = run.first_matrix + (unit - run.first_unit);
  const int64_t first = run.first_row + (unit - run.first_unit) * R;
  float* state = a.s.row_state + first;
  const float* sums = a.s.row_sums + first;
  const float* counts = a.s.row_counts + first;
  double leaf[kPerThread];
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) leaf[k] = 0.0;
  // Thread t owns leaves t + k * kThreads: rows base + t + k * kThreads of each pass.
  for (int64_t base = 0; base < R; base += kLeaves) {
    float old[kPerThread], sum[kPerThread], count[kPerThread];
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int64_t i = base + threadIdx.x + (int64_t)k * kThreads;
      old[k] = 0.0f;
      sum[k] = 0.0f;
      count[k] = 1.0f;
      if (i < R) {
        old[k] = state[i];
        sum[k] = sums[i];
        count[k] = counts[i];
      }
    }
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int64_t i = base + threadIdx.x + (int64_t)k * kThreads;
      if (i < R) {
        const float v = ema(old[k], sum[k], count[k], a.beta, a.one_minus_beta);
        state[i] = v;
        leaf[k] += (double)v;
      }
    }
  }
  // Leaves 32q .. 32q + 31 sit in one warp (lane = leaf % 32): q = k * kWarps + warp.
  __shared__ double partial[kLeaves / 32];
  __shared__ float shared_mean;
  const int lane = threadIdx.x & 31, warp = threadIdx.x >> 5;
#pragma unroll
  for (int k = 0; k < kPerThread; ++k) {
    const double total = group_sum(leaf[k], 32);
    if (lane == 0) partial[k * kWarps + warp] = total;
  }
  __syncthreads();
  if (warp == 0) {
    const double total = group_sum(partial[lane], 32);
    if (lane == 0) {
      const float mean = (float)(total / (double)R);
      a.s.means[matrix] = mean;
      shared_mean = mean;
    }
  }
  __syncthreads();
  const float mean = shared_mean;
  float* factor = a.s.row_factor + first;
  for (int64_t base = 0; base < R; base += kLeaves) {
#pragma unroll
    for (int k = 0; k < kPerThread; ++k) {
      const int64_t i = base + threadIdx.x + (int64_t)k * kThreads;
      if (i < R) factor[i] = rsqrtf(__fdiv_rn(state[i], mean));  // this thread's own store
    }
  }
}

// One warp task: 32 / g matrices of R <= kFactorWarpRows rows, g = next_pow2(R) lanes each.
// The whole warp takes the same branch (same task), so every shuffle has all 32 lanes.
__device__ void warp_matrices(const FactorArgs& a, int64_t task) {
  if (task >= a.warp_units) return;  // warp-uniform
  const FactorRun run = a.runs[find_run(a.runs, a.block_runs, a.num_runs, task)];
  const int64_t R = run.rows_per_matrix;
  int width = 1;
  while (width < R) width <<= 1;
  const int lane = threadIdx.x & 31;
  const int64_t local = (task - run.first_unit) * (32 / width) + lane / width;  // matrix within the run
  const int64_t j = lane & (width - 1);                                         // row within the matrix
  const bool valid = local < run.matrices && j < R;
  const int64_t i = run.first_row + local * R + j;
  float v = 0.0f;
  if (valid) {
    v = ema(a.s.row_state[i], a.s.row_sums[i], a.s.row_counts[i], a.beta, a.one_minus_beta);
    a.s.row_state[i] = v;
  }
  const double total = group_sum(valid ? (double)v : 0.0, width);
  if (valid) {
    const float mean = (float)(total / (double)R);
    if (j == 0) a.s.means[run.first_matrix + local] = mean;
    a.s.row_factor[i] = rsqrtf(__fdiv_rn(v, mean));
  }
}

__device__ void columns(const FactorArgs& a, int64_t block) {
  const int64_t stride = a.column_blocks * kThreads;
  for (int64_t j = block * kThreads + threadIdx.x; j < a.s.num_cols; j += stride) {
    const float v = ema(a.s.col_state[j], a.s.col_sums[j], a.s.col_counts[j], a.beta, a.one_minus_beta);
    a.s.col_state[j] = v;
    a.s.col_factor[j] = rsqrtf(v);
  }
}

__global__ void __launch_bounds__(kThreads) factor_kernel(FactorArgs a) {
  const int64_t block = blockIdx.x;
  if (block < a.block_units) {
    block_matrix(a, block);
  } else if (block < a.block_units + a.warp_blocks) {
    warp_matrices(a, (block - a.block_units) * kWarps + (threadIdx.x >> 5));
  } else {
    columns(a, block - a.block_units - a.warp_blocks);
  }
}

}  // namespace

FactorPlan dc_prepare_factor_runs(const int64_t* rows_per_matrix, const int64_t* run_rows, int count, FactorRun* table) {
  FactorPlan plan{0, 0, 0, 0};
  // Two passes over the runs in row order: the block runs, then the warp runs.
  for (int pass = 0; pass < 2; ++pass) {
    int64_t row = 0, matrix = 0;
    for (int r = 0; r < count; ++r) {
      const int64_t R = rows_per_matrix[r], matrices = R > 0 ? run_rows[r] / R : 0;
      const bool block = R > kFactorWarpRows;
      if (matrices > 0 && block == (pass == 0)) {
        FactorRun& run = table[plan.runs++];
        run.first_row = row;
        run.rows_per_matrix = R;
        run.first_matrix = matrix;
        run.matrices = matrices;
        if (block) {
          run.first_unit = plan.block_units;
          plan.block_units += matrices;
          plan.block_runs += 1;
        } else {
          int64_t width = 1;
          while (width < R) width <<= 1;
          const int64_t per_task = 32 / width;
          run.first_unit = plan.warp_units;
          plan.warp_units += (matrices + per_task - 1) / per_task;
        }
      }
      row += run_rows[r];
      matrix += matrices;
    }
  }
  return plan;
}

cudaError_t launch_came_factor_update(const FactorSpans& spans, const FactorRun* runs, const FactorPlan& plan, float beta,
                                      float one_minus_beta, cudaStream_t stream) {
  FactorArgs args{};
  args.s = spans;
  args.runs = runs;
  args.num_runs = plan.runs;
  args.block_runs = plan.block_runs;
  args.block_units = plan.block_units;
  args.warp_units = plan.warp_units;
  args.warp_blocks = (plan.warp_units + kWarps - 1) / kWarps;
  const int64_t wanted = (spans.num_cols + kThreads - 1) / kThreads;
  args.column_blocks = wanted < kMaxColumnBlocks ? wanted : kMaxColumnBlocks;
  args.beta = beta;
  args.one_minus_beta = one_minus_beta;
  const int64_t blocks = args.block_units + args.warp_blocks + args.column_blocks;
  if (blocks <= 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  DC_LAUNCH((unsigned)blocks, kThreads, 0, stream, factor_kernel)(args);
  return cudaGetLastError();
}

}  // namespace dist_cautious
