// See step_scalars.h. Compiled with -ffp-contract=off (dist_cautious/kernels/build.py).
#include "step_scalars.h"

#include <cmath>

namespace dist_cautious_cpu {

namespace {

// torch.clamp(x, min=lo): NaN stays NaN.
inline float clamp_min(float x, float lo) { return x < lo ? lo : x; }

}  // namespace

void mask_scales(const float* counts, const float* sizes, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = 1.0f / clamp_min(counts[i] / sizes[i], static_cast<float>(1e-3));
}

void came_clip_divisors(const float* sumsq, const float* sqrt_sizes, float threshold, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = clamp_min(std::sqrt(sumsq[i]) / sqrt_sizes[i] / threshold, 1.0f);
}

}  // namespace dist_cautious_cpu
