// The real csrc/cuda/came_factors.cu, compiled by the host C++ compiler against the CUDA-on-CPU
// headers of include/ (test build only; see build.py).
#include "cuda_runtime.h"
#include "../../../../csrc/cuda/came_factors.cu"
