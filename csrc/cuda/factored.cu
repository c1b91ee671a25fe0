// Tiled multi-tensor kernels for CAME's factored fragments: a flat range [start, start + n) of
// a (*batch, R, C) tensor, cut anywhere (mid-row included). Blocks walk 2-D tiles of
// (global row) x (column), so each element's row id (f / C) and column id
// ((f / (R*C)) * C + f % C) are known from the loop indices without per-element divisions, and
// row / column partial sums are reduced in registers, warp shuffles and shared memory before
// one atomic add per row segment and per column of a tile.
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
  float eps1;           // kSqSums
  float eps2;           // kMomentum
  float beta1, one_minus_beta1;
  const float* divisors;  // kMomentum, per out_index
  float decay, neg_lr;  // kApply
  const float* scales;  // kApply, may be null
  double* sums;         // kSumsq
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
                                         unsigned long long& count, double& sumsq) {
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
  float divisor = 1.0f, scale = 1.0f;
  if constexpr (M == kMomentum) divisor = a.divisors[d.out_index];
  if constexpr (M == kApply) scale = a.scales ? a.scales[d.out_index] : 1.0f;

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
  int64_t acc_batch = batch;  // the matrix col_acc belongs to

  for (int j = 0; j < kRowIters; ++j) {
    const bool row_ok = row < row_stop;
    if constexpr (Traits<M>::row_col) {
      if (!one_matrix && batch != acc_batch) {  // flush column sums of the previous matrix
#pragma unroll
        for (int k = 0; k < kColsPerThread; ++k) {
          if (col[k] < C && col_acc[k] != 0.0f) atomicAdd(d.col_out + acc_batch * C + col[k], col_acc[k]);
          col_acc[k] = 0.0f;
        }
        acc_batch = batch;
      }
    }
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
          count += agrees(m_new, g) ? 1ull : 0ull;
        } else {  // kApply
          float update = __fmul_rn(precond, loaded_m[k]);
          if (a.scales) update = agrees(loaded_m[k], g) ? __fmul_rn(update, scale) : 0.0f;
          const float p = __fmul_rn(loaded_p[k], a.decay);
          Elem<PT>::store(param, i, __fmaf_rn(a.neg_lr, update, p));
        }
      }
    }
    if constexpr (Traits<M>::row_col) {
      const float total = segment_sum(row_part, lanes);
      if (x == 0 && row_ok && col[0] < C) {
        // Only rows that hold local elements in this tile's columns.
        const int64_t seg_lo = row_flat + col[0];
        const int64_t seg_hi = row_flat + min(C, col_tile * tile_cols + tile_cols);
        if (seg_hi > lo && seg_lo < hi) atomicAdd(d.row_out + row, total);
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
    if (one_matrix) {
      // Reduce column sums over the block's rows in shared memory: one atomic per column.
      const int width = kColsPerThread * lanes;  // == tile_cols
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
        const int64_t matrix = row_begin / R;
#pragma unroll
        for (int k = 0; k < kColsPerThread; ++k) {
          const float total = shared_cols[k * lanes + x];
          if (col[k] < C && total != 0.0f) atomicAdd(d.col_out + matrix * C + col[k], total);
        }
      }
    } else {
#pragma unroll
      for (int k = 0; k < kColsPerThread; ++k) {
        if (col[k] < C && col_acc[k] != 0.0f) atomicAdd(d.col_out + acc_batch * C + col[k], col_acc[k]);
      }
    }
  }
}

template <int M>
__global__ void __launch_bounds__(kThreads) tile_kernel(const FactoredDesc* __restrict__ descs, int count, TileArgs args) {
  __shared__ float shared_cols[kThreads * kColsPerThread];
  __shared__ unsigned long long shared_counts[kThreads / 32];
  __shared__ double shared_sums[kThreads / 32];
  const int t = find_desc(descs, count, (int64_t)blockIdx.x);
  const FactoredDesc d = descs[t];
  const int64_t tile = (int64_t)blockIdx.x - d.first_block;
  unsigned long long local_count = 0;
  double local_sumsq = 0.0;
  DC_DISPATCH_TYPES_MAYBE(M == kApply, d.param_dtype, d.grad_dtype, run_tile<M, PT, GT>(d, args, tile, shared_cols, local_count, local_sumsq));
  if constexpr (Traits<M>::counts) {
    const unsigned long long total = block_sum(local_count, shared_counts);
    if (threadIdx.x == 0 && total) atomicAdd(args.counts + d.out_index, total);
  }
  if constexpr (Traits<M>::sumsq) {
    const double total = block_sum(local_sumsq, shared_sums);
    if (threadIdx.x == 0) atomicAdd(args.sums + d.out_index, total);
  }
}

template <int M>
cudaError_t launch_tiles(const FactoredDesc* descs, int count, int64_t blocks, const TileArgs& args, cudaStream_t stream) {
  if (count <= 0 || blocks <= 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  DC_LAUNCH((unsigned)blocks, kThreads, 0, stream, tile_kernel<M>)(descs, count, args);
  return cudaGetLastError();
}

}  // namespace

int64_t dc_prepare_factored(FactoredDesc* descs, int count) {
  int64_t blocks = 0;
  for (int t = 0; t < count; ++t) {
    FactoredDesc& d = descs[t];
    // Lanes per row segment: the smallest power of two covering C with 4 columns per lane.
    int lanes = 1;
    while (lanes < 32 && (int64_t)lanes * kColsPerThread < d.cols) lanes <<= 1;
    d.lanes = lanes;
    d.first_block = blocks;
    if (d.n <= 0) {
      d.row_lo = 0;
      d.num_rows = 0;
      d.col_tiles = 1;
      continue;
    }
    d.row_lo = d.start / d.cols;
    d.num_rows = (d.start + d.n - 1) / d.cols - d.row_lo + 1;
    const int64_t tile_rows = (int64_t)(kThreads / lanes) * kRowIters;
    const int64_t tile_cols = (int64_t)kColsPerThread * lanes;
    d.col_tiles = (d.cols + tile_cols - 1) / tile_cols;
    blocks += ((d.num_rows + tile_rows - 1) / tile_rows) * d.col_tiles;
  }
  return blocks;
}

cudaError_t launch_came_factored_sq_sums(const FactoredDesc* descs, int count, int64_t blocks, float eps1,
                                         cudaStream_t stream) {
  TileArgs args{};
  args.eps1 = eps1;
  return launch_tiles<kSqSums>(descs, count, blocks, args, stream);
}

cudaError_t launch_came_factored_sumsq(const FactoredDesc* descs, int count, int64_t blocks, double* sums,
                                       cudaStream_t stream) {
  TileArgs args{};
  args.sums = sums;
  return launch_tiles<kSumsq>(descs, count, blocks, args, stream);
}

cudaError_t launch_came_factored_momentum(const FactoredDesc* descs, int count, int64_t blocks,
                                          const float* divisors, float beta1, float one_minus_beta1, float eps2,
                                          unsigned long long* counts, cudaStream_t stream) {
  TileArgs args{};
  args.divisors = divisors;
  args.beta1 = beta1;
  args.one_minus_beta1 = one_minus_beta1;
  args.eps2 = eps2;
  args.counts = counts;
  return launch_tiles<kMomentum>(descs, count, blocks, args, stream);
}

cudaError_t launch_came_factored_apply(const FactoredDesc* descs, int count, int64_t blocks, float decay,
                                       float neg_lr, const float* scales, cudaStream_t stream) {
  TileArgs args{};
  args.decay = decay;
  args.neg_lr = neg_lr;
  args.scales = scales;
  return launch_tiles<kApply>(descs, count, blocks, args, stream);
}

}  // namespace dist_cautious
