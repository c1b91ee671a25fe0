// The real csrc/cuda/step_scalars.cu, compiled by the host C++ compiler against the CUDA-on-CPU
// headers of include/ (test build only; see build.py).
#include "cuda_runtime.h"
#include "../../../../csrc/cuda/step_scalars.cu"
