// Per-tensor scalars a step derives from values reduced across ranks, for all tensors of a call
// at once (dist_cautious/kernels/reference.py: mask_scales). Plain C++ over fp32 vectors, no
// torch types; a few values per tensor, so one loop.
//
// CAME's RMS-clip divisors, max(sqrt(sumsq) / sqrt(N) / d, 1), are not here: torch's CPU sqrt is
// MKL's vector math (up to 0.75 ulp from the exact root, so not what an IEEE sqrt gives), and an
// ulp of difference in a divisor moves every element of the update the same way. Measured: with
// an IEEE sqrt here, ZeRO-3 CAME on 2 ranks landed 1.39x the sharded-vs-single test tolerance
// from the single-process run on torch's ops (0.48x before, 0.62x with torch's sqrt).
#pragma once

#include <cstdint>

namespace dist_cautious_cpu {

// scale = 1 / max(count / size, 1e-3): torch's div, clamp_min (NaN propagates) and reciprocal,
// each rounded to fp32 as torch rounds it (bit for bit).
void mask_scales(const float* counts, const float* sizes, float* out, int64_t n);

}  // namespace dist_cautious_cpu
