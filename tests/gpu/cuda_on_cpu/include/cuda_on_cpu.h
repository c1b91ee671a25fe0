// CUDA on CPU threads, for tests only: lets the REAL csrc/cuda/*.cu sources compile with the
// host C++ compiler and run on the CPU, so CI executes the kernels without a GPU.
//
// What is emulated, and how:
//   * one kernel launch runs its blocks one after another; each block's threads are fibers on
//     the launching thread (blockDim.x of them; see "fibers" below), not OS threads;
//   * __syncthreads is a barrier over the block's live threads: a thread that returns from the
//     kernel leaves the barrier, so the others are not deadlocked (CUDA semantics of exited
//     threads); a barrier that can never complete is a launch error instead of a hang;
//   * warp shuffles go through a per-warp exchange (each lane publishes its value, a warp
//     barrier, each lane reads its source lane, a second warp barrier); a shuffle from a lane that
//     has exited, or with a mask other than the full warp, is recorded as a launch error;
//   * __shared__ is `static`: blocks run one at a time, so the block's threads share it and no
//     two blocks ever see it at once (its contents at block start are, as on a GPU, unspecified);
//   * atomicAdd is std::atomic_ref::fetch_add;
//   * fp32 intrinsics (__fadd_rn, __fmaf_rn, ...) are IEEE ops in round-to-nearest-even (the
//     test build uses -ffp-contract=off so the compiler cannot fuse them differently); rsqrtf,
//     which the GPU computes only to within 2 ulp, is deliberately perturbed by up to
//     DC_EMU_RSQRT_ULPS ulps so the tests' tolerances must cover the hardware's freedom;
//   * bf16 / fp16 conversions reproduce cuda_bf16.hpp / cuda_fp16.hpp bit for bit: rn (nearest
//     even, subnormals, overflow to inf, canonical NaN 0x7fff), and rz / rd / ru for the tests
//     that plant a wrong rounding mode.
// Only the test build (tests/gpu/cuda_on_cpu/build.py) puts this directory on the include path;
// the shipped nvcc build never sees it.
#pragma once

#include <atomic>
#include <cmath>
#include <cstdint>
#include <cstring>
#include <functional>
#include <memory>
#include <mutex>
#include <string>
#include <tuple>
#include <type_traits>
#include <utility>
#include <vector>

#include <sys/mman.h>
#include <ucontext.h>
#include <unistd.h>

#define DC_CUDA_ON_CPU 1

#define __global__
#define __device__
#define __host__
#define __forceinline__ inline
#define __launch_bounds__(...)
#define __shared__ static

#ifndef DC_EMU_RSQRT_ULPS
#define DC_EMU_RSQRT_ULPS 2
#endif

// ---- runtime types ------------------------------------------------------------------------------
enum cudaError_t : int {
  cudaSuccess = 0,
  cudaErrorInvalidValue = 1,
  cudaErrorInvalidConfiguration = 9,
  cudaErrorIllegalInstruction = 715,
  cudaErrorLaunchFailure = 719,
};
typedef struct CUstream_st* cudaStream_t;

struct dim3 {
  unsigned x = 1, y = 1, z = 1;
  dim3() = default;
  dim3(unsigned x_, unsigned y_ = 1, unsigned z_ = 1) : x(x_), y(y_), z(z_) {}
};

inline thread_local dim3 threadIdx;
inline thread_local dim3 blockIdx;
inline dim3 blockDim;
inline dim3 gridDim;

namespace dc_emu {

inline std::mutex error_mutex;
inline cudaError_t last_error = cudaSuccess;
inline std::string last_error_text;

inline void record_error(cudaError_t error, const std::string& text) {
  std::lock_guard<std::mutex> lock(error_mutex);
  if (last_error == cudaSuccess) {
    last_error = error;
    last_error_text = text;
  }
}

// The threads of a block are fibers (ucontext coroutines) on the launching thread, not OS
// threads: a fiber runs until it waits at a barrier or returns, then the next ready one runs.
// With real threads, each __syncthreads of a 1024-thread block cost 1024 futex wake-ups and
// context switches, which made up most of the emulated tests' time on a 2-core machine.
// Execution is deterministic; the scheduler sweeps the block's fibers in ascending thread order
// and descending order alternately, so a read of shared memory that lacks the barrier before it
// sees the unwritten value in one of the two orders, whichever thread writes.

// A reusable barrier whose participant count can shrink while fibers wait (a thread that
// returns from the kernel calls drop()). A fiber waits for the barrier's generation to move on.
class Barrier {
 public:
  void reset(int participants) {
    participants_ = participants;
    arrived_ = 0;
  }
  void arrive_and_wait();
  void drop() {
    --participants_;
    if (arrived_ > 0 && arrived_ >= participants_) release();
  }
  uint64_t generation() const { return generation_; }

 private:
  void release() {
    arrived_ = 0;
    ++generation_;
  }
  int participants_ = 0;
  int arrived_ = 0;
  uint64_t generation_ = 0;
};

// The state of the block being run: its barriers and the per-warp shuffle exchange.
struct Warp {
  Barrier barrier;
  uint64_t slots[32] = {};
  bool exited[32] = {};
};

struct Block {
  Barrier sync;
  std::vector<std::unique_ptr<Warp>> warps;
  void reset(unsigned threads) {
    sync.reset(static_cast<int>(threads));
    for (unsigned w = 0; w < warps.size(); ++w) {
      const unsigned first = w * 32, live = threads - first < 32 ? threads - first : 32;
      warps[w]->barrier.reset(static_cast<int>(live));
      for (int lane = 0; lane < 32; ++lane) warps[w]->exited[lane] = lane >= static_cast<int>(live);
    }
  }
};

inline Block* current_block = nullptr;

// One emulated thread: its context, its stack (kept across launches, see stack_of), and what it
// waits for (a barrier and the generation it arrived in).
struct Fiber {
  ucontext_t context;
  unsigned tid = 0;
  bool done = false;
  const Barrier* waits_on = nullptr;
  uint64_t generation = 0;
  bool ready() const { return !done && (waits_on == nullptr || waits_on->generation() != generation); }
};

// 256 KiB of stack per fiber under a PROT_NONE guard page, so an overflow faults instead of
// writing into the next fiber's stack. Mapped once per thread index and reused by every launch.
constexpr size_t kFiberStack = 256 * 1024;

inline char* stack_of(unsigned tid) {
  static std::vector<char*> stacks;
  if (stacks.size() <= tid) stacks.resize(tid + 1, nullptr);
  if (stacks[tid] == nullptr) {
    const size_t page = static_cast<size_t>(sysconf(_SC_PAGESIZE));
    void* base = mmap(nullptr, kFiberStack + page, PROT_READ | PROT_WRITE, MAP_PRIVATE | MAP_ANONYMOUS, -1, 0);
    if (base == MAP_FAILED) return nullptr;
    mprotect(base, page, PROT_NONE);
    stacks[tid] = static_cast<char*>(base) + page;
  }
  return stacks[tid];
}

struct Scheduler {
  ucontext_t main;
  Fiber* running = nullptr;
  std::function<void(unsigned)> body;  // runs the kernel for thread `tid` of the current block
};

inline Scheduler* scheduler = nullptr;

inline void fiber_main() {
  Scheduler& s = *scheduler;
  s.body(s.running->tid);
  s.running->done = true;  // uc_link returns to the scheduler
}

inline void Barrier::arrive_and_wait() {
  if (++arrived_ >= participants_) {
    release();
    return;
  }
  Fiber& self = *scheduler->running;
  self.waits_on = this;
  self.generation = generation_;
  swapcontext(&self.context, &scheduler->main);
  self.waits_on = nullptr;
}

template <typename T>
inline T shuffle(unsigned mask, T value, int src_lane) {
  static_assert(sizeof(T) <= 8 && std::is_trivially_copyable<T>::value, "shuffle of a value wider than 8 bytes");
  const unsigned lane = threadIdx.x & 31u;
  Warp& warp = *current_block->warps[threadIdx.x >> 5];
  if (mask != 0xffffffffu) record_error(cudaErrorIllegalInstruction, "warp shuffle with a partial mask (not emulated)");
  uint64_t bits = 0;
  std::memcpy(&bits, &value, sizeof(T));
  warp.slots[lane] = bits;
  warp.barrier.arrive_and_wait();
  T out = value;
  if (src_lane >= 0 && src_lane < 32) {
    if (warp.exited[src_lane]) {
      record_error(cudaErrorIllegalInstruction, "warp shuffle reads a lane that has exited");
    } else {
      std::memcpy(&out, &warp.slots[src_lane], sizeof(T));
    }
  }
  warp.barrier.arrive_and_wait();  // nobody overwrites a slot before every lane has read it
  return out;
}

// Every fiber of the block at the start of fiber_main; an error text, or nullptr.
inline const char* start_fibers(std::vector<Fiber>& fibers, Scheduler& sched) {
  for (unsigned tid = 0; tid < fibers.size(); ++tid) {
    Fiber& f = fibers[tid];
    f = Fiber{};
    f.tid = tid;
    char* stack = stack_of(tid);
    if (stack == nullptr || getcontext(&f.context) != 0) return "no stack for an emulated thread";
    f.context.uc_stack.ss_sp = stack;
    f.context.uc_stack.ss_size = kFiberStack;
    f.context.uc_link = &sched.main;
    makecontext(&f.context, fiber_main, 0);
  }
  return nullptr;
}

// Sweep the block's ready fibers, alternating the direction, until all have returned; an error
// text when some never can (the waiting fibers are abandoned: their stacks hold nothing that
// needs freeing), else nullptr.
inline const char* run_fibers(std::vector<Fiber>& fibers, Scheduler& sched, bool& descending) {
  const size_t n = fibers.size();
  for (size_t live = n; live > 0;) {
    bool ran = false;
    for (size_t k = 0; k < n; ++k) {
      Fiber& f = fibers[descending ? n - 1 - k : k];
      if (!f.ready()) continue;
      sched.running = &f;
      threadIdx = dim3(f.tid);
      swapcontext(&sched.main, &f.context);
      ran = true;
      if (f.done) --live;
    }
    descending = !descending;
    if (!ran) return "__syncthreads or a warp shuffle that some live threads never reach (a GPU hangs)";
  }
  return nullptr;
}

// Launch `kernel` over grid x block threads: blocks in order, each block's threads as fibers.
// A block whose live threads all wait at barriers that can no longer complete (a __syncthreads
// some threads never reach) is a launch error, where a GPU would hang.
template <typename... Params>
struct Launch {
  void (*kernel)(Params...);
  dim3 grid, block;
  template <typename... Args>
  void operator()(Args&&... args) const {
    const unsigned threads = block.x * block.y * block.z;
    if (block.y != 1 || block.z != 1 || grid.y != 1 || grid.z != 1 || threads == 0 || threads > 1024 || grid.x == 0) {
      record_error(cudaErrorInvalidConfiguration, "launch configuration not emulated or invalid");
      return;
    }
    std::tuple<std::decay_t<Params>...> bound(std::forward<Args>(args)...);
    Block state;
    for (unsigned w = 0; w < (threads + 31) / 32; ++w) state.warps.emplace_back(new Warp());
    std::vector<Fiber> fibers(threads);
    Scheduler sched;
    sched.body = [&](unsigned tid) {
      std::apply(kernel, bound);  // each thread gets its own copy of the by-value params
      // Leave the block's barriers as an exited thread does.
      Warp& warp = *state.warps[tid >> 5];
      warp.exited[tid & 31] = true;
      warp.barrier.drop();
      state.sync.drop();
    };
    scheduler = &sched;
    blockDim = block;
    gridDim = grid;
    current_block = &state;
    const char* failure = nullptr;
    bool descending = false;
    for (unsigned b = 0; b < grid.x && failure == nullptr; ++b) {
      blockIdx = dim3(b);
      state.reset(threads);
      failure = start_fibers(fibers, sched);
      if (failure == nullptr) failure = run_fibers(fibers, sched, descending);
    }
    scheduler = nullptr;
    current_block = nullptr;
    if (failure != nullptr) record_error(cudaErrorLaunchFailure, failure);
  }
};

template <typename... Params>
inline Launch<Params...> launcher(dim3 grid, dim3 block, void (*kernel)(Params...)) {
  return Launch<Params...>{kernel, grid, block};
}

}  // namespace dc_emu

// Kernel launches in csrc/cuda are written DC_LAUNCH(grid, block, shmem, stream, kernel)(args);
// nvcc expands it to kernel<<<grid, block, shmem, stream>>>(args).
#define DC_LAUNCH(GRID, BLOCK, SHMEM, STREAM, ...) ::dc_emu::launcher(dim3(GRID), dim3(BLOCK), __VA_ARGS__)

inline cudaError_t cudaGetLastError() {
  std::lock_guard<std::mutex> lock(dc_emu::error_mutex);
  const cudaError_t error = dc_emu::last_error;
  dc_emu::last_error = cudaSuccess;
  return error;
}

inline const char* cudaGetErrorString(cudaError_t error) {
  switch (error) {
    case cudaSuccess: return "no error";
    case cudaErrorInvalidValue: return "invalid argument";
    case cudaErrorInvalidConfiguration: return "invalid configuration argument";
    case cudaErrorIllegalInstruction: return "an illegal instruction was encountered (emulated)";
    default: return "unspecified launch failure";
  }
}

// ---- synchronisation, warp shuffles, atomics --------------------------------------------------
inline void __syncthreads() { dc_emu::current_block->sync.arrive_and_wait(); }

template <typename T>
inline T __shfl_down_sync(unsigned mask, T value, unsigned delta) {
  const int lane = static_cast<int>(threadIdx.x & 31u), src = lane + static_cast<int>(delta);
  return dc_emu::shuffle(mask, value, src < 32 ? src : lane);
}

template <typename T>
inline T __shfl_xor_sync(unsigned mask, T value, int lane_mask) {
  return dc_emu::shuffle(mask, value, static_cast<int>(threadIdx.x & 31u) ^ lane_mask);
}

namespace dc_emu {
// Floating-point atomic adds performed so far: their order (so their rounding) varies from run
// to run on a GPU, so a kernel that must repeat bit for bit may use none (the tests read this).
inline std::atomic<int64_t> float_atomics{0};
}  // namespace dc_emu

template <typename T>
inline T atomicAdd(T* address, T value) {
  if constexpr (std::is_floating_point<T>::value) dc_emu::float_atomics.fetch_add(1, std::memory_order_relaxed);
  return std::atomic_ref<T>(*address).fetch_add(value);
}

// ---- fp32 intrinsics -----------------------------------------------------------------------------
inline float __fadd_rn(float a, float b) { return a + b; }
inline float __fsub_rn(float a, float b) { return a - b; }
inline float __fmul_rn(float a, float b) { return a * b; }
inline float __fdiv_rn(float a, float b) { return a / b; }
inline float __fmaf_rn(float a, float b, float c) { return std::fma(a, b, c); }
inline float __fsqrt_rn(float a) { return std::sqrt(a); }
inline float fabsf(float a) { return std::fabs(a); }

namespace dc_emu {
inline uint32_t bits_of(float f) { uint32_t u; std::memcpy(&u, &f, 4); return u; }
inline float float_of(uint32_t u) { float f; std::memcpy(&f, &u, 4); return f; }
}  // namespace dc_emu

// CUDA documents rsqrtf to within 2 ulp. The emulation returns the correctly rounded value moved
// by -2..+2 ulp (a fixed function of the input), so a test that passes here does not depend on
// the GPU rounding rsqrtf one particular way.
inline float rsqrtf(float x) {
  const float exact = static_cast<float>(1.0 / std::sqrt(static_cast<double>(x)));
  if (!std::isfinite(exact) || exact == 0.0f || DC_EMU_RSQRT_ULPS == 0) return exact;
  const uint32_t u = dc_emu::bits_of(x);
  const int shift = static_cast<int>((u * 2654435761u) >> 29) % (2 * DC_EMU_RSQRT_ULPS + 1) - DC_EMU_RSQRT_ULPS;
  return dc_emu::float_of(dc_emu::bits_of(exact) + shift);
}

inline int64_t min(int64_t a, int64_t b) { return a < b ? a : b; }
inline int64_t max(int64_t a, int64_t b) { return a > b ? a : b; }
inline int min(int a, int b) { return a < b ? a : b; }
inline int max(int a, int b) { return a > b ? a : b; }
