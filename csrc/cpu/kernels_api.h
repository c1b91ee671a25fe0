// The per-ISA kernel table: plain functions over raw pointers and a local element range
// [lo, hi) (or one row segment of a factored tensor), no torch types, no threading. The
// dispatcher (binding.cpp) validates tensors, picks the ISA once, and splits work into tiles
// that it runs with OpenMP; each ISA translation unit fills one KernelTable.
//
// dtype codes for params and grads: 0 = fp32, 1 = bf16, 2 = fp16. State is always fp32.
#pragma once

#include <cstdint>

namespace dist_cautious_cpu {

enum DType : int { kF32 = 0, kBF16 = 1, kF16 = 2 };

// torch.lerp(a, b, w) for a python-float weight w: |w| < 0.5 ? fma(w, b - a, a)
// : fma(w - 1, b - a, b) (torch's vectorized lerp; w - 1 rounded in fp32).
struct Lerp {
  float coeff;  // w or w - 1
  bool small;   // |w| < 0.5: base is a (old value), else b (gradient)
};

struct AdamParams {
  float decay;   // 1 - lr * wd
  Lerp m;        // exp_avg.lerp_(g, 1 - beta1)
  float beta2;   // exp_avg_sq.mul_(beta2) ...
  float one_minus_beta2;  // ... .addcmul_(g, g, value=1 - beta2)
  float sqrt_bc2;  // sqrt(1 - beta2^t)
  float eps;
  float neg_step_size;  // -lr / (1 - beta1^t)
  bool cautious;
  float scale;  // 1 / max(mean(phi), 1e-3) of the whole tensor (cautious only)
};

struct LionParams {
  float decay;
  Lerp update;  // sign(lerp(m, g, 1 - beta1))
  Lerp m;       // exp_avg.lerp_(g, 1 - beta2)
  float neg_lr;
  bool cautious;
  float scale;
};

struct CameMomentumParams {
  float clip;     // max(1, RMS(uh) / d)
  float beta1;
  float one_minus_beta1;
  float eps2;
};

struct CameApplyParams {
  float decay;
  float neg_lr;
  bool cautious;
  float scale;
};

struct KernelTable {
  const char* name;
  int width;  // fp32 lanes per vector
  int64_t (*adamw_count)(const void* g, int gt, const float* m, int64_t lo, int64_t hi, Lerp w);
  void (*adamw_apply)(void* p, int pt, const void* g, int gt, float* m, float* v, int64_t lo, int64_t hi, const AdamParams& a);
  int64_t (*lion_count)(const void* g, int gt, const float* m, int64_t lo, int64_t hi, Lerp w);
  void (*lion_apply)(void* p, int pt, const void* g, int gt, float* m, int64_t lo, int64_t hi, const LionParams& a);
  // Cautious Lion in two passes around the mask reduction, through a 2-bit code per element
  // (2 bytes per 8 elements, see kernels.h).
  int64_t (*lion_encode)(const void* g, int gt, float* m, uint8_t* code, int64_t lo, int64_t hi, Lerp update, Lerp m_weight);
  void (*lion_decode_apply)(void* p, int pt, const uint8_t* code, int64_t lo, int64_t hi, float decay, float neg_lr, float scale);
  // CAME. "segment": `len` elements at local offset `off`, all in one row; `colf` / `col_acc`
  // point at the segment's first column (`col_acc[j] += x_j` in fp32; the dispatcher flushes it
  // into double every few rows). "elem": 1-D / 0-D path, `v` null means identity.
  double (*came_sq_segment)(const void* g, int gt, int64_t off, int64_t len, float eps1, float* col_acc);
  void (*came_vector_moment)(const void* g, int gt, float* v, int64_t lo, int64_t hi, float beta2, float one_minus_beta2, float eps1);
  double (*came_sumsq_segment)(const void* g, int gt, int64_t off, int64_t len, float rowf, const float* colf);
  double (*came_sumsq_elem)(const void* g, int gt, const float* v, int64_t lo, int64_t hi);
  double (*came_momentum_segment)(const void* g, int gt, float* m, int64_t off, int64_t len, float rowf, const float* colf,
                                  const CameMomentumParams& a, float* col_acc, int64_t* count);
  int64_t (*came_momentum_elem)(const void* g, int gt, float* m, const float* v, int64_t lo, int64_t hi, const CameMomentumParams& a);
  void (*came_apply_segment)(void* p, int pt, const void* g, int gt, const float* m, int64_t off, int64_t len, float rowf,
                             const float* colf, const CameApplyParams& a);
  void (*came_apply_elem)(void* p, int pt, const void* g, int gt, const float* m, const float* v, int64_t lo, int64_t hi,
                          const CameApplyParams& a);
};

// Defined by kernels_scalar.cpp (always), kernels_avx2.cpp and kernels_avx512.cpp (x86-64 only).
extern const KernelTable scalar_table;
extern const KernelTable avx2_table;
extern const KernelTable avx512_table;
bool avx2_compiled();
bool avx512_compiled();

}  // namespace dist_cautious_cpu
