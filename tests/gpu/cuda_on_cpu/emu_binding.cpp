// The real csrc/cuda/binding.cpp, with DC_CUDA_ON_CPU (set in include/cuda_on_cpu.h): the same
// entry points and checks, on CPU tensors, launching the emulated kernels (test build only).
#include "cuda_runtime.h"
#include "../../../../csrc/cuda/binding.cpp"
