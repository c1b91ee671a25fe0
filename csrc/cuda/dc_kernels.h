// Host-side interface of the dist_cautious CUDA kernels: plain structs of raw pointers and
// sizes, and launchers that take a cudaStream_t. No torch header is included here or in the
// .cu files, so every kernel compiles with nvcc alone (CI compile-checks them without a GPU);
// csrc/cuda/binding.cpp is the only torch-aware file.
//
// Each launcher covers a whole list of flat tensors in ONE kernel launch ("multi-tensor
// apply"): the descriptors live in device memory, every block finds its tensor by binary search
// over the descriptors' first_block prefix, and all offsets are 64-bit, so a list with more
// than 2^31 elements in total (or one tensor that large) is fine.
//
// The arithmetic mirrors dist_cautious/kernels/reference.py op for op: every intermediate that
// the reference stores as an fp32 tensor is rounded to fp32 here too (explicit __f*_rn
// intrinsics, so nvcc cannot contract across those boundaries), and a reference op of the form
// a + alpha * b is one fused multiply-add, as in torch's own CUDA kernels.
#pragma once

#include <cstdint>

#include <cuda_runtime.h>

namespace dist_cautious {

// Element types of params and grads; state is always fp32.
enum DcDtype : int32_t { kF32 = 0, kBF16 = 1, kF16 = 2 };

// Elements per block of the elementwise kernels (a block loops over its chunk), and threads per
// block. The shipped build uses the defaults; the CPU-emulated test build
// (tests/gpu/cuda_on_cpu) defines small values so every chunk and tile boundary occurs at small
// sizes. kThreads must be a multiple of 32 and a power of two (block and tile reductions).
#ifndef DC_CHUNK
#define DC_CHUNK 65536
#endif
#ifndef DC_THREADS
#define DC_THREADS 256
#endif
constexpr int64_t kChunk = DC_CHUNK;
constexpr int kThreads = DC_THREADS;
static_assert(kThreads >= 32 && kThreads % 32 == 0 && (kThreads & (kThreads - 1)) == 0, "kThreads: a power of two >= 32");

// One flat tensor of an elementwise kernel. Unused pointers are null.
struct ElemDesc {
  void* param;           // param_dtype, written in place by apply kernels
  const void* grad;      // grad_dtype
  float* exp_avg;        // fp32 state
  float* exp_avg_sq;     // fp32 state (AdamW v; CAME 1-D second moment)
  int64_t n;             // local elements
  int64_t first_block;   // prefix sum of blocks over the list (filled by dc_prepare_elem)
  int32_t param_dtype;
  int32_t grad_dtype;
  int32_t out_index;     // slot in counts / scales / sums / divisors
  int32_t pad;
  float alpha;           // AdamW: -(lr / (1 - beta1^t)) as fp32
  float inv_bc2_sqrt;    // AdamW: 1 / fp32(sqrt(1 - beta2^t)), torch's scalar-division form
  // Apply kernels: the tensor's own lr and weight decay, so one launch spans param groups that
  // differ in them. The host forms both in double, exactly as the reference, and rounds to fp32.
  // A launch with a step-scalars table (below) reads these four from it instead: the binding
  // then leaves them at fixed values, so the descriptors do not change from step to step.
  float decay;           // AdamW, Lion, CAME: 1 - lr * wd
  float neg_lr;          // Lion, CAME: -lr
};
// Uploaded as raw bytes and read by the kernels in the same compilation's layout; the size is
// a multiple of the 8-byte alignment, so an array of them has no padding between elements.
static_assert(sizeof(ElemDesc) == 80 && alignof(ElemDesc) == 8, "ElemDesc layout");

// One flat range [start, start + n) of a (*batch, R, C) tensor for the tiled CAME kernels.
// Global row id of flat index f is f / C (length B*R state); column id is (f / (R*C)) * C + f % C
// (length B*C state): exactly FactoredLayout's convention.
struct FactoredDesc {
  void* param;
  const void* grad;
  float* exp_avg;
  float* row_out;          // full-size (B*R) partial-sum buffer, added into
  float* col_out;          // full-size (B*C) partial-sum buffer, added into
  const float* row_factor; // B*R factor (already normalised and rsqrt-ed)
  const float* col_factor; // B*C factor (already rsqrt-ed)
  int64_t start;           // global flat offset of the local range
  int64_t n;               // local elements
  int64_t rows;            // R, rows per matrix
  int64_t cols;            // C
  int64_t row_lo;          // first global row touched: start / C
  int64_t num_rows;        // global rows touched
  int64_t col_tiles;       // tiles across the columns
  int64_t first_block;     // prefix sum of tiles over the list (filled by dc_prepare_factored)
  // Fixed-order row/column sums (no float atomics, so a run repeats bit for bit): each tile
  // writes its row-segment sums and its per-matrix column sums into scratch slots, and a second
  // kernel adds each output's slots in a fixed order. Filled by dc_prepare_factored.
  int64_t row_tiles;       // tiles down the rows
  int64_t mats_per_tile;   // column-slot groups per row tile: most matrices tile_rows rows can touch
  int64_t row_scratch;     // offset of num_rows x col_tiles row-segment sums in the scratch buffer
  int64_t col_scratch;     // offset of row_tiles x mats_per_tile x C column sums
  int64_t first_out;       // prefix sum of outputs (num_rows + touched matrices x C) over the list
  int32_t lanes;           // threads per row segment (power of two <= 32)
  int32_t param_dtype;
  int32_t grad_dtype;
  int32_t out_index;
  float decay;             // apply: 1 - lr * wd of this tensor, as fp32 (see ElemDesc::decay)
  float neg_lr;            // apply: -lr of this tensor, as fp32
};
static_assert(sizeof(FactoredDesc) == 184 && alignof(FactoredDesc) == 8, "FactoredDesc layout");

// capturable=True (lr and step live on the device, so a CUDA graph can capture the step): the
// apply kernels read each tensor's step scalars from a device table instead of the descriptor
// fields above. fp32, row-major [slots, kStepScalarColumns]; row `out_index` of a descriptor
// holds its tensor's values in exactly the fp32 form of the fields (alpha, inv_bc2_sqrt, decay,
// neg_lr), so a table and the fields with the same values give the same bits. A null table:
// the descriptor fields. Columns an op does not use are ignored (Lion and CAME: alpha and
// inv_bc2_sqrt).
enum StepScalarColumn : int { kAlphaColumn = 0, kInvBc2SqrtColumn = 1, kDecayColumn = 2, kNegLrColumn = 3 };
constexpr int kStepScalarColumns = 4;

// Fill first_block for each descriptor and return the total number of blocks (host only).
int64_t dc_prepare_elem(ElemDesc* descs, int count);
int64_t dc_prepare_factored(FactoredDesc* descs, int count);
// The scratch of the factored row/column launches: `floats` slots (device memory the caller
// allocates and puts in `slots`) and the launch's `outputs` (rows + columns it adds into). From
// the host descriptors, after dc_prepare_factored.
struct FactoredScratch {
  float* slots;
  int64_t floats;
  int64_t outputs;
};
FactoredScratch dc_factored_scratch(const FactoredDesc* descs, int count);

// Sums of squares (float64) are deterministic too: each block writes its partial into
// `partials` (one double per block of the launch, scratch), then one thread per descriptor adds
// its blocks' partials in block order into sums[out_index]; out_index must differ between the
// descriptors of one launch (the binding checks it).

// --- AdamW / Lion ------------------------------------------------------------------------
// counts[out_index] += #{ m_new * g > 0 } with m_new = lerp(m, g, weight): read-only.
// sign_of_update: Lion counts sign(m_new) * g > 0 (same set, kept explicit for clarity).
cudaError_t launch_lerp_mask_counts(const ElemDesc* descs, int count, int64_t blocks, float weight, bool lion,
                                    unsigned long long* counts, cudaStream_t stream);

// One AdamW step over the list; scales (per out_index, device) may be null (not cautious).
// Per tensor: alpha, inv_bc2_sqrt, decay, from step_scalars when not null, else the descriptor.
cudaError_t launch_adamw_apply(const ElemDesc* descs, int count, int64_t blocks, float lerp_weight, float beta2,
                               float one_minus_beta2, float eps, const float* scales, const float* step_scalars,
                               cudaStream_t stream);

// One Lion step over the list; scales may be null. Per tensor: decay, neg_lr (step_scalars or descriptor).
cudaError_t launch_lion_apply(const ElemDesc* descs, int count, int64_t blocks, float weight1, float weight2,
                              const float* scales, const float* step_scalars, cudaStream_t stream);

// --- CAME, 1-D / 0-D fragments (elementwise) ------------------------------------------------
// v = beta2 v + (1 - beta2)(g^2 + eps1)
cudaError_t launch_came_vector_second_moment(const ElemDesc* descs, int count, int64_t blocks, float beta2,
                                             float one_minus_beta2, float eps1, cudaStream_t stream);
// sums[out_index] += sum((precond * g)^2); precond = rsqrt(exp_avg_sq) or 1 when exp_avg_sq is null
cudaError_t launch_came_vector_sumsq(const ElemDesc* descs, int count, int64_t blocks, double* sums,
                                     double* partials, cudaStream_t stream);
// uh = precond * g / divisor; m = beta1 m + (1 - beta1) uh; counts += #{m * g > 0}
cudaError_t launch_came_vector_momentum(const ElemDesc* descs, int count, int64_t blocks, const float* divisors,
                                        float beta1, float one_minus_beta1, unsigned long long* counts,
                                        cudaStream_t stream);
// u = precond * m (masked, scaled); p = p * decay; p += neg_lr * u (decay, neg_lr per tensor:
// step_scalars or descriptor)
cudaError_t launch_came_vector_apply(const ElemDesc* descs, int count, int64_t blocks, const float* scales,
                                     const float* step_scalars, cudaStream_t stream);

// --- CAME, factored fragments (tiled: row and column known without divisions) -------------
// `scratch` from dc_factored_scratch, slots allocated; the row_out / col_out buffers of one
// launch must be distinct (each output is added by one thread).
cudaError_t launch_came_factored_sq_sums(const FactoredDesc* descs, int count, int64_t blocks, float eps1,
                                         FactoredScratch scratch, cudaStream_t stream);
cudaError_t launch_came_factored_sumsq(const FactoredDesc* descs, int count, int64_t blocks, double* sums,
                                       double* partials, cudaStream_t stream);
// uh = (row*col) * g / divisor; m = beta1 m + (1-beta1) uh; (uh - m)^2 + eps2 into row_out/col_out;
// counts += #{m * g > 0}
cudaError_t launch_came_factored_momentum(const FactoredDesc* descs, int count, int64_t blocks,
                                          const float* divisors, float beta1, float one_minus_beta1, float eps2,
                                          unsigned long long* counts, FactoredScratch scratch, cudaStream_t stream);
// u = (row*col) * m (masked, scaled); p = p * decay + neg_lr * u (decay, neg_lr per tensor:
// step_scalars or descriptor)
cudaError_t launch_came_factored_apply(const FactoredDesc* descs, int count, int64_t blocks, const float* scales,
                                       const float* step_scalars, cudaStream_t stream);


// --- CAME factor math between reductions (came_factors.cu) ----------------------------------
// The flat fp32 buffers of one segment (dist_cautious/kernels/reference.py, FactorBuffers):
// rows of all matrices back to back, then likewise the columns.
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
};

// One run of `matrices` consecutive matrices of `rows_per_matrix` (R) rows each, in the
// device-side run table: runs of R > kFactorWarpRows first (one block per matrix: `first_unit` is
// the run's first block), then the others (32 / next_pow2(R) matrices per warp: `first_unit` is
// the run's first warp task). Empty runs are left out.
struct FactorRun {
  int64_t first_row;
  int64_t rows_per_matrix;
  int64_t first_matrix;
  int64_t matrices;
  int64_t first_unit;
};
static_assert(sizeof(FactorRun) == 40 && alignof(FactorRun) == 8, "FactorRun layout");
// Matrices of at most this many rows share a warp; larger ones get a block each.
constexpr int64_t kFactorWarpRows = 32;

struct FactorPlan {
  int runs;              // entries of the table (non-empty runs)
  int block_runs;        // of which the first block_runs have R > kFactorWarpRows
  int64_t block_units;   // blocks of those runs (one per matrix)
  int64_t warp_units;    // warp tasks of the others
};

// Fill `table` (room for `count` runs) from the (R, rows) runs in row order and return the
// plan (host only). The runs must be whole matrices (the binding checks).
FactorPlan dc_prepare_factor_runs(const int64_t* rows_per_matrix, const int64_t* run_rows, int count, FactorRun* table);

// x = sums / counts; state = fma(1 - beta, x, state * beta) for rows and columns; each matrix's
// mean of its updated row state, summed in float64 in a fixed order that depends on R alone
// (rows i, i + 1024, ... into leaf i % 1024, the 1024 leaves then added in pairs of neighbours,
// level by level), rounded once: mean = fp32(sum / R); row factor rsqrtf(state / mean), column
// factor rsqrtf(state) (torch's CUDA rsqrt is ::rsqrt(float) = rsqrtf). `runs`: the table of
// dc_prepare_factor_runs in device memory. One launch, no scratch.
cudaError_t launch_came_factor_update(const FactorSpans& spans, const FactorRun* runs, const FactorPlan& plan, float beta,
                                      float one_minus_beta, cudaStream_t stream);

// --- Per-tensor step scalars from reduced values (step_scalars.cu) ---------------------------
// One launch over n values each, a grid-stride loop; nothing launched for n == 0. Rounded as
// torch's CUDA ops (see step_scalars.cu), so they match them bit for bit.
// The floor of the mask's mean, as torch's clamp(min=1e-3) rounds it: fp32 of the double 1e-3.
constexpr float kMaskScaleFloor = static_cast<float>(1e-3);
// out = 1 / max(counts / sizes, kMaskScaleFloor) (NaN propagates)
cudaError_t launch_mask_scales(const float* counts, const float* sizes, float* out, int64_t n, cudaStream_t stream);
// out = max(sqrt(sumsq) / sqrt_sizes * inv_threshold, 1) (NaN propagates); inv_threshold is
// 1.0f / fp32(clip_threshold), the factor torch's CUDA division by a Python scalar multiplies by.
cudaError_t launch_came_clip_divisors(const float* sumsq, const float* sqrt_sizes, float inv_threshold, float* out, int64_t n,
                                      cudaStream_t stream);

}  // namespace dist_cautious
