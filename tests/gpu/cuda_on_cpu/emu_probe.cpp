// Test-only entry points that expose the emulation's own primitives, so the tests can check them
// directly: the bf16 / fp16 conversion intrinsics (bit for bit against torch's rounding), and the
// barrier semantics of __syncthreads when some threads of a block return early, and the
// emulated rsqrtf.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/full.h>
#include <torch/library.h>

#include <string>
#include <vector>

#include "cuda_runtime.h"

namespace {

// Each float's bits through __float2bfloat16_<mode> / __float2half_<mode>, as int16 bits.
at::Tensor convert(const at::Tensor& values, const std::string& format, const std::string& mode) {
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.is_contiguous() && values.is_cpu(), "float32 CPU tensor expected");
  at::Tensor out = at::empty(values.sizes(), values.options().dtype(at::kShort));
  const float* in = values.data_ptr<float>();
  int16_t* bits = out.data_ptr<int16_t>();
  for (int64_t i = 0; i < values.numel(); ++i) {
    uint16_t b = 0;
    if (format == "bf16") {
      if (mode == "rn") b = __float2bfloat16_rn(in[i]).bits;
      else if (mode == "rz") b = __float2bfloat16_rz(in[i]).bits;
      else if (mode == "rd") b = __float2bfloat16_rd(in[i]).bits;
      else if (mode == "ru") b = __float2bfloat16_ru(in[i]).bits;
      else TORCH_CHECK(false, "mode rn, rz, rd or ru");
    } else if (format == "fp16") {
      if (mode == "rn") b = __float2half_rn(in[i]).bits;
      else if (mode == "rz") b = __float2half_rz(in[i]).bits;
      else if (mode == "rd") b = __float2half_rd(in[i]).bits;
      else if (mode == "ru") b = __float2half_ru(in[i]).bits;
      else TORCH_CHECK(false, "mode rn, rz, rd or ru");
    } else {
      TORCH_CHECK(false, "format bf16 or fp16");
    }
    bits[i] = static_cast<int16_t>(b);
  }
  return out;
}

// Back to float through __bfloat162float / __half2float.
at::Tensor widen(const at::Tensor& bits, const std::string& format) {
  TORCH_CHECK(bits.scalar_type() == at::kShort && bits.is_contiguous() && bits.is_cpu(), "int16 CPU tensor expected");
  at::Tensor out = at::empty(bits.sizes(), bits.options().dtype(at::kFloat));
  const int16_t* in = bits.data_ptr<int16_t>();
  float* values = out.data_ptr<float>();
  for (int64_t i = 0; i < bits.numel(); ++i) {
    const uint16_t b = static_cast<uint16_t>(in[i]);
    values[i] = format == "bf16" ? __bfloat162float(__nv_bfloat16{b}) : __half2float(__half{b});
  }
  return out;
}

// A block in which threads >= `stay` return at once and the others pass `rounds` barriers, each
// time adding their id into a shared sum that thread 0 records after the barrier. Without
// early-exit handling this deadlocks; with a broken barrier the recorded sums are wrong.
__global__ void early_exit_kernel(int stay, int rounds, long long* out) {
  __shared__ long long total[1];
  if ((int)threadIdx.x >= stay) return;
  for (int r = 0; r < rounds; ++r) {
    if (threadIdx.x == 0) total[0] = 0;
    __syncthreads();
    atomicAdd(reinterpret_cast<unsigned long long*>(total), (unsigned long long)(threadIdx.x + 1));
    __syncthreads();
    if (threadIdx.x == 0) out[blockIdx.x * rounds + r] = total[0];
    __syncthreads();
  }
}

// Warp shuffles: lane i of every warp returns (shfl_down by `delta`, shfl_xor by `mask`) of
// the value 1000 * warp + lane.
__global__ void shuffle_kernel(int delta, int mask, int* down, int* xored) {
  const int value = 1000 * (int)(threadIdx.x >> 5) + (int)(threadIdx.x & 31);
  down[blockIdx.x * blockDim.x + threadIdx.x] = __shfl_down_sync(0xffffffffu, value, (unsigned)delta);
  xored[blockIdx.x * blockDim.x + threadIdx.x] = __shfl_xor_sync(0xffffffffu, value, mask);
}

// Thread `writer` stores blockIdx.x + 1 in shared memory, every thread reads it back; with
// `sync` there is a __syncthreads between the two, as CUDA requires, without it a data race.
__global__ void broadcast_kernel(int writer, int sync, int* out) {
  __shared__ int value[1];
  if ((int)threadIdx.x == writer) value[0] = (int)blockIdx.x + 1;
  if (sync) __syncthreads();
  out[blockIdx.x * blockDim.x + threadIdx.x] = value[0];
}

at::Tensor broadcast(int64_t blocks, int64_t threads, int64_t writer, bool sync) {
  at::Tensor out = at::empty({blocks * threads}, at::TensorOptions().dtype(at::kInt));
  DC_LAUNCH((unsigned)blocks, (unsigned)threads, 0, nullptr, broadcast_kernel)((int)writer, sync ? 1 : 0, out.data_ptr<int>());
  const cudaError_t error = cudaGetLastError();
  TORCH_CHECK(error == cudaSuccess, cudaGetErrorString(error));
  return out;
}

// Threads below `split` wait at __syncthreads while the rest of their warp waits in a
// full-warp shuffle: neither can complete (on a GPU, a hang); the emulation must report it.
// Returns the launch's error and the emulation's reason.
__global__ void split_barrier_kernel(int split, int* out) {
  if ((int)threadIdx.x < split) {
    __syncthreads();
  } else {
    out[threadIdx.x] = __shfl_xor_sync(0xffffffffu, (int)threadIdx.x, 1);
    __syncthreads();
  }
}

std::string split_barrier(int64_t threads, int64_t split) {
  std::vector<int> out(static_cast<size_t>(threads), 0);
  DC_LAUNCH(1u, (unsigned)threads, 0, nullptr, split_barrier_kernel)((int)split, out.data());
  const cudaError_t error = cudaGetLastError();
  return error == cudaSuccess ? std::string("no error") : std::string(cudaGetErrorString(error)) + ": " + dc_emu::last_error_text;
}

at::Tensor early_exit(int64_t blocks, int64_t threads, int64_t stay, int64_t rounds) {
  at::Tensor out = at::full({blocks * rounds}, -1, at::TensorOptions().dtype(at::kLong));
  DC_LAUNCH((unsigned)blocks, (unsigned)threads, 0, nullptr, early_exit_kernel)((int)stay, (int)rounds, reinterpret_cast<long long*>(out.data_ptr<int64_t>()));
  const cudaError_t error = cudaGetLastError();
  TORCH_CHECK(error == cudaSuccess, cudaGetErrorString(error));
  return out;
}

std::vector<at::Tensor> shuffles(int64_t blocks, int64_t threads, int64_t delta, int64_t mask) {
  at::Tensor down = at::empty({blocks * threads}, at::TensorOptions().dtype(at::kInt));
  at::Tensor xored = at::empty({blocks * threads}, at::TensorOptions().dtype(at::kInt));
  DC_LAUNCH((unsigned)blocks, (unsigned)threads, 0, nullptr, shuffle_kernel)((int)delta, (int)mask, down.data_ptr<int>(), xored.data_ptr<int>());
  const cudaError_t error = cudaGetLastError();
  TORCH_CHECK(error == cudaSuccess, cudaGetErrorString(error));
  return {down, xored};
}

int64_t float_atomics() { return dc_emu::float_atomics.load(); }

// The emulation's rsqrtf of each value (deliberately up to DC_EMU_RSQRT_ULPS ulps off the
// correctly rounded result), so a test can tell which value a kernel applied rsqrtf to.
at::Tensor rsqrtf_of(const at::Tensor& values) {
  TORCH_CHECK(values.scalar_type() == at::kFloat && values.is_contiguous() && values.is_cpu(), "float32 CPU tensor expected");
  at::Tensor out = at::empty(values.sizes(), values.options());
  const float* in = values.data_ptr<float>();
  float* result = out.data_ptr<float>();
  for (int64_t i = 0; i < values.numel(); ++i) result[i] = rsqrtf(in[i]);
  return out;
}

}  // namespace

// torch.ops.dc_cuda_emu.*: registered with the dispatcher so they need no second pybind module.
TORCH_LIBRARY(dc_cuda_emu, m) {
  m.def("convert(Tensor values, str format, str mode) -> Tensor", &convert);
  m.def("widen(Tensor bits, str format) -> Tensor", &widen);
  m.def("early_exit(int blocks, int threads, int stay, int rounds) -> Tensor", &early_exit);
  m.def("float_atomics() -> int", &float_atomics);
  m.def("rsqrtf(Tensor values) -> Tensor", &rsqrtf_of);
  m.def("broadcast(int blocks, int threads, int writer, bool sync) -> Tensor", &broadcast);
  m.def("split_barrier(int threads, int split) -> str", &split_barrier);
  m.def("shuffles(int blocks, int threads, int delta, int mask) -> Tensor[]", &shuffles);
}
