// Per-tensor scalars a step derives from values reduced across ranks, for all tensors of a batch
// in ONE launch each (dist_cautious/kernels/reference.py: mask_scales, came_clip_divisors), where
// torch's ops take three and four. A few values per tensor: the point is the launch count.
//
// Rounding as torch's CUDA ops, so both match them bit for bit on the same GPU (this file is
// built without --use_fast_math, as ATen is):
//   * mask_scales, `1.0 / (counts / sizes).clamp(min=1e-3)`: tensor / tensor is an IEEE division
//     (ATen's DivFunctor, a / b); clamp(min=) keeps a NaN and otherwise returns
//     (v < lo ? lo : v) with lo = fp32(1e-3) (ClampScalarFunctor); Python's `1.0 / t` is
//     torch's `t.reciprocal() * 1.0`, and reciprocal_kernel_cuda is `1 / a` in float, an IEEE
//     division; the product by 1.0 changes no value (a NaN stays NaN);
//   * came_clip_divisors, `(sumsq.sqrt() / sqrt_sizes / d).clamp(min=1.0)`: sqrt_kernel_cuda is
//     ::sqrt(float) = sqrtf, correctly rounded without --use_fast_math (-prec-sqrt=true); then an
//     IEEE division; then the division by a Python scalar, which div_true_kernel_cuda runs as
//     x * inv_b with inv_b = 1.0f / fp32(d) formed on the host (the binding forms it the same
//     way and passes it in); then clamp(min=1.0) as above.

#include "dc_device.cuh"

namespace dist_cautious {
namespace {

// Enough blocks for any batch of tensors (a grid-stride loop covers the rest).
constexpr int64_t kMaxScalarBlocks = 1024;

// torch's clamp(min=lo) on a float: NaN stays NaN (the comparison is false), -0.0 < lo gives lo.
__device__ __forceinline__ float clamp_min(float v, float lo) { return v < lo ? lo : v; }

__global__ void __launch_bounds__(kThreads) mask_scales_kernel(const float* counts, const float* sizes, float* out, int64_t n) {
  const int64_t stride = (int64_t)gridDim.x * kThreads;
  for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < n; i += stride) {
    out[i] = __fdiv_rn(1.0f, clamp_min(__fdiv_rn(counts[i], sizes[i]), kMaskScaleFloor));
  }
}

__global__ void __launch_bounds__(kThreads)
    clip_divisors_kernel(const float* sumsq, const float* sqrt_sizes, float inv_threshold, float* out, int64_t n) {
  const int64_t stride = (int64_t)gridDim.x * kThreads;
  for (int64_t i = (int64_t)blockIdx.x * kThreads + threadIdx.x; i < n; i += stride) {
    out[i] = clamp_min(__fmul_rn(__fdiv_rn(__fsqrt_rn(sumsq[i]), sqrt_sizes[i]), inv_threshold), 1.0f);
  }
}

unsigned scalar_blocks(int64_t n) {
  const int64_t wanted = (n + kThreads - 1) / kThreads;
  return (unsigned)(wanted < kMaxScalarBlocks ? wanted : kMaxScalarBlocks);
}

}  // namespace

cudaError_t launch_mask_scales(const float* counts, const float* sizes, float* out, int64_t n, cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  DC_LAUNCH(scalar_blocks(n), kThreads, 0, stream, mask_scales_kernel)(counts, sizes, out, n);
  return cudaGetLastError();
}

cudaError_t launch_came_clip_divisors(const float* sumsq, const float* sqrt_sizes, float inv_threshold, float* out, int64_t n,
                                      cudaStream_t stream) {
  if (n <= 0) return cudaSuccess;
  DC_LAUNCH(scalar_blocks(n), kThreads, 0, stream, clip_divisors_kernel)(sumsq, sqrt_sizes, inv_threshold, out, n);
  return cudaGetLastError();
}

}  // namespace dist_cautious
