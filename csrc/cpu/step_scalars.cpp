// See step_scalars.h. Compiled with -ffp-contract=off (dist_cautious/kernels/build.py).
#include "step_scalars.h"

namespace dist_cautious_cpu {

namespace {

// torch.clamp(x, min=lo): NaN stays NaN.
inline float clamp_min(float x, float lo) { return x < lo ? lo : x; }

}  // namespace

void mask_scales(const float* counts, const float* sizes, float* out, int64_t n) {
  for (int64_t i = 0; i < n; ++i) out[i] = 1.0f / clamp_min(counts[i] / sizes[i], static_cast<float>(1e-3));
}

}  // namespace dist_cautious_cpu
