// Test-only stand-in for <cuda_bf16.h>: see cuda_on_cpu.h.
#pragma once
#include "cuda_on_cpu.h"
#include "cuda_on_cpu_fp16.h"
