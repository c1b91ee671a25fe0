// Per-tensor scalars a step derives from values reduced across ranks, for all tensors of a call
// at once (dist_cautious/kernels/reference.py: mask_scales, came_clip_divisors). Plain C++ over
// fp32 vectors, no torch types; a few values per tensor, so one loop.
#pragma once

#include <cstdint>

namespace dist_cautious_cpu {

// scale = 1 / max(count / size, 1e-3): torch's div, clamp_min (NaN propagates) and reciprocal,
// each rounded to fp32 as torch rounds it (bit for bit).
void mask_scales(const float* counts, const float* sizes, float* out, int64_t n);

// divisor = max(sqrt(sumsq) / sqrt_size / threshold, 1): CAME's RMS clip. The square root is
// IEEE's (correctly rounded); torch's CPU sqrt comes from MKL's vector math and may be 1 ulp off
// it (measured up to 0.75 ulp from the exact root), so a divisor above 1 may differ from the
// torch ops' by that ulp. Division and clamp as torch rounds them.
void came_clip_divisors(const float* sumsq, const float* sqrt_sizes, float threshold, float* out, int64_t n);

}  // namespace dist_cautious_cpu
