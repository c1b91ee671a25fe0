// Tiled multi-tensor kernels for CAME's factored fragments: a flat range [start, start + n) of
// a (*batch, R, C) tensor, cut anywhere (mid-row included). Blocks walk 2-D tiles of
// (global row) x (column), so each element's row id (f / C) and column id
// ((f / (R*C)) * C + f % C) are known from the loop indices without per-element divisions, and
// row / column partial sums are reduced in registers, warp shuffles and shared memory.
//
// Deterministic: no floating-point atomics. Each tile writes one sum per (row, column tile) and
// one per (row tile, matrix, column) into scratch slots, every slot in a fixed order; a second
// small kernel adds each row's and each column's slots in order into row_out / col_out. So a
// CUDA run repeats bit for bit (and a resumed run continues exactly), whatever the block order.
//
// Tile shape: `lanes` (L, a power of two <= 32) threads share a row segment of 4*L columns, so
// a warp reads L consecutive columns per load (coalesced), and a block holds kThreads / L rows
// per pass and kRowIters passes. L adapts to C (C = 3, a conv kernel's width, uses L = 1), so
// narrow matrices do not leave most threads idle.
//
// Modes (one pass over memory each, in CAME's phase order):
//   kSqSums    row/col partial sums of g^2 + eps1                               (reads g)
//   kSumsq     sum of squares of uh = (row*col) * g                              (reads g)
//   kMomentum  uh = (row*col) * g / clip; m = b1 m + (1-b1) uh; row/col partial sums of
//              (uh - m)^2 + eps2; count of m * g > 0                             (reads g, m; writes m)
//   kApply     u = (row*col) * m (masked, scaled); p = p (1 - lr wd) - lr u      (reads p, m, g; writes p)

#include <type_traits>

#include "dc_device.cuh"

namespace dist_cautious {
namespace {

constexpr int kColsPerThread = 4;
// Row passes per tile; the CPU-emulated test build makes it small (see dc_kernels.h).
#ifndef DC_ROW_ITERS
#define DC_ROW_ITERS 8
#endif
constexpr int kRowIters = DC_ROW_ITERS;

enum Mode : int { kSqSums = 0, kSumsq = 1, kMomentum = 2, kApply = 3 };

struct TileArgs {
  float* scratch;       // kSqSums, kMomentum: row/column slots (see FactoredDesc)
  double* partials;     // kSumsq: one per block
  float eps1;           // kSqSums
  float eps2;           // kMomentum
  float beta1, one_minus_beta1;
  const float* divisors;  // kMomentum, per out_index
  const float* scales;  // kApply, may be null
  const float* step_scalars;  // kApply, may be null: decay and neg_lr from the descriptor
  unsigned long long* counts;  // kMomentum
};

template <int M>
struct Traits {
  static constexpr bool row_col = (M == kSqSums || M == kMomentum);
  static constexpr bool counts = (M == kMomentum);
  static constexpr bool sumsq = (M == kSumsq);
};

// Sum over the `lanes` consecutive lanes of a row segment (all 32 lanes must call it).
__device__ __forceinline__ float segment_sum(float value, int lanes) {
  for (int offset = lanes >> 1; offset > 0; offset >>= 1) value += __shfl_xor_sync(0xffffffffu, value, offset);
  return value;
}

template <int M, typename PT, typename GT>
__device__ __forceinline__ void run_tile(const FactoredDesc& d, const TileArgs& a, int64_t tile, float* shared_cols,
                                         float* stage, unsigned long long& count, double& sumsq) {
  const int lanes = d.lanes;
  const int x = threadIdx.x & (lanes - 1);
  const int y = threadIdx.x / lanes;
  const int rows_per_pass = kThreads / lanes;
  const int64_t tile_rows = (int64_t)rows_per_pass * kRowIters;
  const int64_t tile_cols = (int64_t)kColsPerThread * lanes;
  const int64_t row_tile = tile / d.col_tiles;
  const int64_t col_tile = tile - row_tile * d.col_tiles;
  const int64_t C = d.cols, R = d.rows;
  const int64_t row_begin = d.row_lo + row_tile * tile_rows;
  const int64_t row_stop = min(row_begin + tile_rows, d.row_lo + d.num_rows);
  const int64_t lo = d.start, hi = d.start + d.n;
  // Block-uniform: does the whole tile lie in one matrix of the batch?
  const bool one_matrix = (row_begin / R) == ((row_stop - 1) / R);

  PT* param = static_cast<PT*>(d.param);
  const GT* grad = static_cast<const GT*>(d.grad);
  float* exp_avg = d.exp_avg;
  float divisor = 1.0f, scale = 1.0f, decay = 1.0f, neg_lr = 0.0f;
  if constexpr (M == kMomentum) divisor = a.divisors[d.out_index];
  if constexpr (M == kApply) {
    scale = a.scales ? a.scales[d.out_index] : 1.0f;
    decay = step_scalar(a.step_scalars, d.out_index, kDecayColumn, d.decay);     // this tensor's 1 - lr * wd
    neg_lr = step_scalar(a.step_scalars, d.out_index, kNegLrColumn, d.neg_lr);  // and -lr
  }

  int64_t col[kColsPerThread];
#pragma unroll
  for (int k = 0; k < kColsPerThread; ++k) col[k] = col_tile * tile_cols + x + (int64_t)k * lanes;

  float col_acc[kColsPerThread];
#pragma unroll
  for (int k = 0; k < kColsPerThread; ++k) col_acc[k] = 0.0f;

  // Batch index of this thread's current row, tracked incrementally when rows_per_pass < R.
  int64_t row = row_begin + y;
  int64_t batch = row / R;
  int64_t row_in_matrix = row - batch * R;
  const int width = kColsPerThread * lanes;  // == tile_cols

  for (int j = 0; j < kRowIters; ++j) {
    const bool row_ok = row < row_stop;
    float col_value[kColsPerThread];  // this row's column contributions (multi-matrix tiles)
#pragma unroll
    for (int k = 0; k < kColsPerThread; ++k) col_value[k] = 0.0f;
    float loaded_g[kColsPerThread], loaded_m[kColsPerThread], loaded_p[kColsPerThread];
    bool valid[kColsPerThread];
    const int64_t row_flat = row * C;
#pragma unroll
    for (int k = 0; k < kColsPerThread; ++k) {
      const int64_t f = row_flat + col[k];
      valid[k] = row_ok && col[k] < C && f >= lo && f < hi;
      const int64_t i = f - lo;
      loaded_g[k] = 0.0f;
      loaded_m[k] = 0.0f;
      loaded_p[k] = 0.0f;
      if (valid[k]) {
        if constexpr (M != kApply) loaded_g[k] = Elem<GT>::load(grad, i);
        if constexpr (M == kApply) {
          if (a.scales) loaded_g[k] = Elem<GT>::load(grad, i);
          loaded_p[k] = Elem<PT>::load(param, i);
        }
        if constexpr (M == kMomentum || M == kApply) loaded_m[k] = exp_avg[i];
      }
    }
    float row_part = 0.0f;
    const float row_f = (M != kSqSums && row_ok) ? d.row_factor[row] : 0.0f;
#pragma unroll
    for (int k = 0; k < kColsPerThread; ++k) {
      if (!valid[k]) continue;
      const int64_t i = row_flat + col[k] - lo;
      const float g = loaded_g[k];
      if constexpr (M == kSqSums) {
        const float q = __fadd_rn(__fmul_rn(g, g), a.eps1);
        row_part += q;
        col_acc[k] += q;
        col_value[k] = q;
      } else {
        const float precond = __fmul_rn(row_f, d.col_factor[batch * C + col[k]]);
        if constexpr (M == kSumsq) {
          const float uh = __fmul_rn(precond, g);
          sumsq += (double)__fmul_rn(uh, uh);
        } else if constexpr (M == kMomentum) {
          const float uh = __fdiv_rn(__fmul_rn(precond, g), divisor);
          const float m_new = __fmaf_rn(a.one_minus_beta1, uh, __fmul_rn(loaded_m[k], a.beta1));
          exp_avg[i] = m_new;
          const float diff = __fsub_rn(uh, m_new);
          const float res = __fadd_rn(__fmul_rn(diff, diff), a.eps2);
          row_part += res;
          col_acc[k] += res;
          col_value[k] = res;
          count += agrees(m_new, g) ? 1ull : 0ull;
        } else {  // kApply
          float update = __fmul_rn(precond, loaded_m[k]);
          if (a.scales) update = agrees(loaded_m[k], g) ? __fmul_rn(update, scale) : 0.0f;
          const float p = __fmul_rn(loaded_p[k], decay);
          Elem<PT>::store(param, i, __fmaf_rn(neg_lr, update, p));
        }
      }
    }
    if constexpr (Traits<M>::row_col) {
      const float total = segment_sum(row_part, lanes);
      // Every (row, column tile) slot of the fragment's rows is written, 0 where the row has no
      // local element in this tile's columns.
      if (x == 0 && row_ok) a.scratch[d.row_scratch + (row - d.row_lo) * d.col_tiles + col_tile] = total;
      if (!one_matrix) {
#pragma unroll
        for (int k = 0; k < kColsPerThread; ++k) stage[((int64_t)j * rows_per_pass + y) * width + k * lanes + x] = col_value[k];
      }
    }
    // Next row of this thread.
    row += rows_per_pass;
    if (rows_per_pass < R) {
      row_in_matrix += rows_per_pass;
      if (row_in_matrix >= R) { row_in_matrix -= R; ++batch; }
    } else {
      batch = row / R;
      row_in_matrix = row - batch * R;
    }
  }

  if constexpr (Traits<M>::row_col) {
    float* col_slots = a.scratch + d.col_scratch + row_tile * d.mats_per_tile * C;
    if (one_matrix) {
      // Reduce column sums over the block's rows in shared memory (a fixed tree): one slot per column.
#pragma unroll
      for (int k = 0; k < kColsPerThread; ++k) shared_cols[y * width + k * lanes + x] = col_acc[k];
      __syncthreads();
      for (int stride = rows_per_pass >> 1; stride > 0; stride >>= 1) {
        if (y < stride) {
#pragma unroll
          for (int k = 0; k < kColsPerThread; ++k) shared_cols[y * width + k * lanes + x] += shared_cols[(y + stride) * width + k * lanes + x];
        }
        __syncthreads();
      }
      if (y == 0) {
#pragma unroll
        for (int k = 0; k < kColsPerThread; ++k) {
          if (col[k] < C) col_slots[col[k]] = shared_cols[k * lanes + x];
        }
      }
    } else {
      // Several matrices in the tile: the tile's values are staged in shared memory; one thread
      // per (matrix, column) adds that matrix's rows in row order into its slot.
      __syncthreads();
      const int64_t first_matrix = row_begin / R;
      const int64_t pairs = ((row_stop - 1) / R - first_matrix + 1) * tile_cols;
      for (int64_t pair = threadIdx.x; pair < pairs; pair += kThreads) {
        const int64_t mi = pair / tile_cols, c = pair - mi * tile_cols;
        const int64_t column = col_tile * tile_cols + c;
        if (column >= C) continue;
        const int64_t r0 = max(row_begin, (first_matrix + mi) * R), r1 = min(row_stop, (first_matrix + mi + 1) * R);
        float total = 0.0f;
        for (int64_t r = r0; r < r1; ++r) total += stage[(r - row_begin) * width + c];
        col_slots[mi * C + column] = total;
      }
    }
  }
}

// Adds each output's scratch slots in a fixed order: rows over their column tiles, columns over
// the row tiles that touch their matrix. One thread per output of the whole launch.
__global__ void __launch_bounds__(kThreads) finish_row_col(const FactoredDesc* __restrict__ descs, int count, int64_t outputs,
                                                           const float* __restrict__ scratch) {
  const int64_t o = (int64_t)blockIdx.x * kThreads + threadIdx.x;
  if (o >= outputs) return;
  int lo = 0, hi = count - 1;  // the descriptor whose [first_out, next first_out) holds o
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (descs[mid].first_out <= o) lo = mid; else hi = mid - 1;
  }
  const FactoredDesc& d = descs[lo];
  const int64_t local = o - d.first_out;
  if (local < d.num_rows) {
    const float* slots = scratch + d.row_scratch + local * d.col_tiles;
    float total = 0.0f;
    for (int64_t ct = 0; ct < d.col_tiles; ++ct) total += slots[ct];
    d.row_out[d.row_lo + local] += total;
    return;
  }
  const int64_t R = d.rows, C = d.cols;
  const int64_t tile_rows = (int64_t)(kThreads / d.lanes) * kRowIters;
  const int64_t q = local - d.num_rows;
  const int64_t matrix = d.row_lo / R + q / C, column = q - (q / C) * C;
  const int64_t r0 = max(d.row_lo, matrix * R), r1 = min(d.row_lo + d.num_rows, (matrix + 1) * R);
  float total = 0.0f;
  for (int64_t rt = (r0 - d.row_lo) / tile_rows; rt <= (r1 - 1 - d.row_lo) / tile_rows; ++rt) {
    const int64_t first_matrix = (d.row_lo + rt * tile_rows) / R;
    total += scratch[d.col_scratch + (rt * d.mats_per_tile + matrix - first_matrix) * C + column];
  }
  d.col_out[matrix * C + column] += total;
}

template <int M>
__global__ void __launch_bounds__(kThreads) tile_kernel(const FactoredDesc* __restrict__ descs, int count, TileArgs args) {
  __shared__ float shared_cols[kThreads * kColsPerThread];
  // The tile's values when it holds several matrices (kThreads * kColsPerThread * kRowIters
  // floats: 32 KiB at 256 threads and 8 row passes).
  __shared__ float stage[Traits<M>::row_col ? kThreads * kColsPerThread * kRowIters : 1];
  __shared__ unsigned long long shared_counts[kThreads / 32];
  __shared__ double shared_sums[kThreads / 32];
  const int t = find_desc(descs, count, (int64_t)blockIdx.x);
  const FactoredDesc d = descs[t];
  const int64_t tile = (int64_t)blockIdx.x - d.first_block;
  unsigned long long local_count = 0;
  double local_sumsq = 0.0;
  DC_DISPATCH_TYPES_MAYBE(M == kApply, d.param_dtype, d.grad_dtype, run_tile<M, PT, GT>(d, args, tile, shared_cols, stage, local_count, local_sumsq));
  if constexpr (Traits<M>::counts) {
    const unsigned long long total = block_sum(local_count, shared_counts);
    if (threadIdx.x == 0 && total) atomicAdd(args.counts + d.out_index, total);
  }
  if constexpr (Traits<M>::sumsq) {
    const double total = block_sum(local_sumsq, shared_sums);
    if (threadIdx.x == 0) args.partials[blockIdx.x] = total;
  }
}

// `outputs`: the launch's row + column outputs (kSqSums, kMomentum); `sums`: kSumsq's.
template <int M>
cudaError_t launch_tiles(const FactoredDesc* descs, int count, int64_t blocks, const TileArgs& args, cudaStream_t stream,
                         int64_t outputs = 0, double* sums = nullptr) {
  if (count <= 0 || blocks <= 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL || outputs / kThreads >= 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  DC_LAUNCH((unsigned)blocks, kThreads, 0, stream, tile_kernel<M>)(descs, count, args);
  cudaError_t error = cudaGetLastError();
  if (error != cudaSuccess) return error;
  if constexpr (Traits<M>::row_col) {
    DC_LAUNCH((unsigned)((outputs + kThreads - 1) / kThreads), kThreads, 0, stream, finish_row_col)(descs, count, outputs, args.scratch);
    error = cudaGetLastError();
  }
  if constexpr (Traits<M>::sumsq) error = launch_sum_block_partials(descs, count, blocks, args.partials, sums, stream);
  return error;
}



}  // namespace

int64_t dc_prepare_factored(FactoredDesc* descs, int count) {
  int64_t blocks = 0, scratch = 0, outputs = 0;
  for (int t = 0; t < count; ++t) {
    FactoredDesc& d = descs[t];
    // Lanes per row segment: the smallest power of two covering C with 4 columns per lane.
    int lanes = 1;
    while (lanes < 32 && (int64_t)lanes * kColsPerThread < d.cols) lanes <<= 1;
    d.lanes = lanes;
    d.first_block = blocks;
    d.first_out = outputs;
    d.row_scratch = scratch;
    d.col_scratch = scratch;
    if (d.n <= 0) {
      d.row_lo = 0;
      d.num_rows = 0;
      d.col_tiles = 1;
      d.row_tiles = 0;
      d.mats_per_tile = 0;
      continue;
    }
    d.row_lo = d.start / d.cols;
    d.num_rows = (d.start + d.n - 1) / d.cols - d.row_lo + 1;
    const int64_t tile_rows = (int64_t)(kThreads / lanes) * kRowIters;
    const int64_t tile_cols = (int64_t)kColsPerThread * lanes;
    d.col_tiles = (d.cols + tile_cols - 1) / tile_cols;
    d.row_tiles = (d.num_rows + tile_rows - 1) / tile_rows;
    d.mats_per_tile = (tile_rows - 1) / d.rows + 2;  // tile_rows consecutive rows touch at most this many matrices
    blocks += d.row_tiles * d.col_tiles;
    d.col_scratch = scratch + d.num_rows * d.col_tiles;
    scratch = d.col_scratch + d.row_tiles * d.mats_per_tile * d.cols;
    outputs += d.num_rows + ((d.row_lo + d.num_rows - 1) / d.rows - d.row_lo / d.rows + 1) * d.cols;
  }
  return blocks;
}

FactoredScratch dc_factored_scratch(const FactoredDesc* descs, int count) {
  FactoredScratch sizes{nullptr, 0, 0};
  if (count <= 0) return sizes;
  const FactoredDesc& d = descs[count - 1];
  sizes.floats = d.col_scratch + d.row_tiles * d.mats_per_tile * d.cols;
  sizes.outputs = d.first_out;
  if (d.num_rows > 0) sizes.outputs += d.num_rows + ((d.row_lo + d.num_rows - 1) / d.rows - d.row_lo / d.rows + 1) * d.cols;
  return sizes;
}

cudaError_t launch_came_factored_sq_sums(const FactoredDesc* descs, int count, int64_t blocks, float eps1,
                                         FactoredScratch scratch, cudaStream_t stream) {
  TileArgs args{};
  args.eps1 = eps1;
  args.scratch = scratch.slots;
  return launch_tiles<kSqSums>(descs, count, blocks, args, stream, scratch.outputs);
}

cudaError_t launch_came_factored_sumsq(const FactoredDesc* descs, int count, int64_t blocks, double* sums,
                                       double* partials, cudaStream_t stream) {
  TileArgs args{};
  args.partials = partials;
  return launch_tiles<kSumsq>(descs, count, blocks, args, stream, 0, sums);
}

cudaError_t launch_came_factored_momentum(const FactoredDesc* descs, int count, int64_t blocks,
                                          const float* divisors, float beta1, float one_minus_beta1, float eps2,
                                          unsigned long long* counts, FactoredScratch scratch, cudaStream_t stream) {
  TileArgs args{};
  args.scratch = scratch.slots;
  args.divisors = divisors;
  args.beta1 = beta1;
  args.one_minus_beta1 = one_minus_beta1;
  args.eps2 = eps2;
  args.counts = counts;
  return launch_tiles<kMomentum>(descs, count, blocks, args, stream, scratch.outputs);
}

cudaError_t launch_came_factored_apply(const FactoredDesc* descs, int count, int64_t blocks, const float* scales,
                                       const float* step_scalars, cudaStream_t stream) {
  TileArgs args{};
  args.scales = scales;
  args.step_scalars = step_scalars;
  return launch_tiles<kApply>(descs, count, blocks, args, stream);
}

}  // namespace dist_cautious
