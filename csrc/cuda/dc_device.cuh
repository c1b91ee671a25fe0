// Device helpers shared by the dist_cautious kernels: element loads/stores in fp32 math,
// torch's lerp formula, block reductions, and the block -> tensor lookup of multi-tensor apply.
#pragma once

#include <cstdint>

#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <cuda_runtime.h>

#include "dc_kernels.h"

// Every kernel launch is written DC_LAUNCH(grid, block, shared_bytes, stream, kernel)(args...):
// under nvcc exactly kernel<<<grid, block, shared_bytes, stream>>>(args...); the CPU-emulated
// test build (tests/gpu/cuda_on_cpu) defines it to run the kernel on host threads instead.
#ifndef DC_LAUNCH
#define DC_LAUNCH(GRID, BLOCK, SHMEM, STREAM, ...) __VA_ARGS__<<<GRID, BLOCK, SHMEM, STREAM>>>
#endif

namespace dist_cautious {

template <typename T>
struct Elem;

template <>
struct Elem<float> {
  static __device__ __forceinline__ float load(const float* p, int64_t i) { return p[i]; }
  static __device__ __forceinline__ void store(float* p, int64_t i, float v) { p[i] = v; }
};

template <>
struct Elem<__nv_bfloat16> {
  static __device__ __forceinline__ float load(const __nv_bfloat16* p, int64_t i) { return __bfloat162float(p[i]); }
  // Round to nearest even, as torch's copy_ from fp32.
  static __device__ __forceinline__ void store(__nv_bfloat16* p, int64_t i, float v) { p[i] = __float2bfloat16_rn(v); }
};

template <>
struct Elem<__half> {
  static __device__ __forceinline__ float load(const __half* p, int64_t i) { return __half2float(p[i]); }
  static __device__ __forceinline__ void store(__half* p, int64_t i, float v) { p[i] = __float2half_rn(v); }
};

// torch.lerp(a, b, w) in fp32 exactly as ATen writes it (abs(w) < 0.5 picks the first form),
// with each op rounded separately except the final multiply-add.
__device__ __forceinline__ float torch_lerp(float a, float b, float w) {
  const float diff = __fsub_rn(b, a);
  return fabsf(w) < 0.5f ? __fmaf_rn(w, diff, a) : __fmaf_rn(-diff, __fsub_rn(1.0f, w), b);
}

// sign(x) as torch.sign: -1, 0 or 1, and 0 for NaN (torch computes (0 < x) - (x < 0)); a NaN
// momentum then moves no param, on every kernel set alike.
__device__ __forceinline__ float torch_sign(float x) {
  return x > 0.0f ? 1.0f : (x < 0.0f ? -1.0f : 0.0f);
}

// The cautious mask: the product form, so a product that underflows to zero masks the entry.
__device__ __forceinline__ bool agrees(float update, float grad) { return __fmul_rn(update, grad) > 0.0f; }

// One of a tensor's step scalars (StepScalarColumn): from its row `out_index` of the device
// table when the launch has one (capturable), else the descriptor's own field.
__device__ __forceinline__ float step_scalar(const float* table, int32_t out_index, StepScalarColumn column, float field) {
  return table ? table[(int64_t)out_index * kStepScalarColumns + column] : field;
}

// Index of the descriptor whose [first_block, next first_block) holds `block` (binary search).
template <typename Desc>
__device__ __forceinline__ int find_desc(const Desc* descs, int count, int64_t block) {
  int lo = 0, hi = count - 1;
  while (lo < hi) {
    const int mid = (lo + hi + 1) >> 1;
    if (descs[mid].first_block <= block) {
      lo = mid;
    } else {
      hi = mid - 1;
    }
  }
  return lo;
}

// Sum over the block; the result is valid in thread 0. `shared` holds one value per warp.
template <typename T>
__device__ __forceinline__ T block_sum(T value, T* shared) {
  const int lane = threadIdx.x & 31;
  const int warp = threadIdx.x >> 5;
#pragma unroll
  for (int offset = 16; offset > 0; offset >>= 1) value += __shfl_down_sync(0xffffffffu, value, offset);
  __syncthreads();  // shared may still be read by a previous call
  if (lane == 0) shared[warp] = value;
  __syncthreads();
  T total = T(0);
  if (threadIdx.x == 0) {
    for (int w = 0; w < (int)(blockDim.x >> 5); ++w) total += shared[w];
  }
  return total;
}

// sums[out_index] += the descriptor's block partials, added in block order: one thread per
// descriptor, so the result does not depend on block scheduling (unlike a float atomicAdd).
template <typename Desc>
__global__ void sum_block_partials(const Desc* __restrict__ descs, int count, int64_t blocks, const double* __restrict__ partials,
                                   double* __restrict__ sums) {
  const int t = (int)(blockIdx.x * blockDim.x + threadIdx.x);
  if (t >= count) return;
  const int64_t end = t + 1 < count ? descs[t + 1].first_block : blocks;
  double total = 0.0;
  for (int64_t b = descs[t].first_block; b < end; ++b) total += partials[b];
  sums[descs[t].out_index] += total;
}

template <typename Desc>
cudaError_t launch_sum_block_partials(const Desc* descs, int count, int64_t blocks, const double* partials, double* sums,
                                      cudaStream_t stream) {
  DC_LAUNCH((unsigned)((count + kThreads - 1) / kThreads), kThreads, 0, stream, sum_block_partials<Desc>)(descs, count, blocks, partials, sums);
  return cudaGetLastError();
}

// Dispatch a templated functor call on (param dtype, grad dtype); unknown codes do nothing
// (the binding rejects them before launch).
#define DC_DISPATCH_GRAD(GRAD_DTYPE, PT, ...)                         \
  switch (GRAD_DTYPE) {                                              \
    case kF32: { using GT = float; __VA_ARGS__; break; }             \
    case kBF16: { using GT = __nv_bfloat16; __VA_ARGS__; break; }    \
    case kF16: { using GT = __half; __VA_ARGS__; break; }            \
    default: break;                                                  \
  }

// Ops that never touch the param dispatch on the grad dtype alone (fewer instantiations).
#define DC_DISPATCH_TYPES_MAYBE(USES_PARAM, PARAM_DTYPE, GRAD_DTYPE, ...)  \
  if constexpr (USES_PARAM) {                                            \
    DC_DISPATCH_TYPES(PARAM_DTYPE, GRAD_DTYPE, __VA_ARGS__);             \
  } else {                                                               \
    using PT = float;                                                    \
    DC_DISPATCH_GRAD(GRAD_DTYPE, PT, __VA_ARGS__);                       \
  }

#define DC_DISPATCH_TYPES(PARAM_DTYPE, GRAD_DTYPE, ...)                                     \
  switch (PARAM_DTYPE) {                                                                   \
    case kF32: { using PT = float; DC_DISPATCH_GRAD(GRAD_DTYPE, PT, __VA_ARGS__); break; }  \
    case kBF16: { using PT = __nv_bfloat16; DC_DISPATCH_GRAD(GRAD_DTYPE, PT, __VA_ARGS__); break; } \
    case kF16: { using PT = __half; DC_DISPATCH_GRAD(GRAD_DTYPE, PT, __VA_ARGS__); break; } \
    default: break;                                                                        \
  }

}  // namespace dist_cautious
