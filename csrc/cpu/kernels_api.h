// The per-ISA kernel table: plain functions over raw pointers and a local element range
// [lo, hi) (or one row segment of a factored tensor), no torch types, no threading. The
// dispatcher (binding.cpp) validates tensors, picks the ISA once, and splits work into tiles
// that it runs with OpenMP; each ISA translation unit fills one KernelTable.
//
// dtype codes for params and grads: 0 = fp32, 1 = bf16, 2 = fp16. State is always fp32.
#pragma once

#include <climits>
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

// CAME's cautious mask, one bit per element (bit e % 8 of byte e / 8), written by the momentum
// pass so that the apply pass need not read g again (1/8 B instead of 4 B per element). Bits of
// consecutive elements gather in a register word and are OR-ed into the zeroed buffer one 64-bit
// word at a time, atomically: the row blocks of two threads may meet inside one word.
struct MaskBits {
  uint64_t* words = nullptr;
  int64_t word = -1;
  uint64_t acc = 0;

  // The low `nbits` of `bits` belong to elements e, e + 1, ...
  void put(int64_t e, uint64_t bits, int nbits) {
    const int64_t w = e >> 6;
    const int shift = static_cast<int>(e & 63);
    if (w != word) {
      flush();
      word = w;
    }
    acc |= bits << shift;
    if (shift + nbits > 64) {
      flush();
      word = w + 1;
      acc = bits >> (64 - shift);
    }
  }

  void flush() {
    if (word >= 0 && acc != 0) __atomic_fetch_or(words + word, acc, __ATOMIC_RELAXED);
    acc = 0;
  }

  // Elements from here on are walked by this MaskBits alone, in order (a row block's first element):
  // a word that starts here or later has no other writer.
  int64_t owned_from = INT64_MAX;

  // put() for `nbits` (a power of two, at most 64) bits at an element e that is a multiple of
  // nbits, so that they never straddle a word. A word completed here is stored as it is, without
  // the atomic OR (a locked instruction, which waits for every store before it), when no other
  // walk writes into it.
  void put_aligned(int64_t e, uint64_t bits, int nbits) {
    const int64_t w = e >> 6;
    if (w != word) {
      flush();
      word = w;
    }
    acc |= bits << (e & 63);
    if (((e + nbits) & 63) == 0) {
      if ((w << 6) >= owned_from) {
        words[w] = acc;
        acc = 0;
      } else {
        flush();
      }
    }
  }
};

// Bits e .. e + nbits - 1 (nbits <= 16) of a mask buffer; the buffer has 8 bytes of padding.
inline uint32_t mask_bits_at(const uint8_t* mask, int64_t e, int nbits) {
  uint64_t x;
  __builtin_memcpy(&x, mask + (e >> 3), sizeof(x));
  return static_cast<uint32_t>((x >> (e & 7)) & ((uint64_t{1} << nbits) - 1));
}

// Whole rows that CAME's phase 1 walks in step (came_sq_rows).
constexpr int kCameSqRows = 4;

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
  void (*came_fold_segment)(const void* g, int gt, int64_t off, int64_t len, float a, float* col_acc);
  // `rows` (1..kCameSqRows) consecutive whole rows of `len` elements from `off`, walked in step:
  // came_sq_segment of each (row sums into sums[0..rows)), after came_fold_segment of the
  // `fold_rows` rows from `fold_off` (weights fold_a, into fold_acc), bit for bit; a full group
  // folding a full group does both in one walk.
  void (*came_sq_rows)(const void* g, int gt, int64_t off, int64_t len, int rows, float eps1, float* col_acc, double* sums,
                       int64_t fold_off, int fold_rows, const float* fold_a, float* fold_acc);
  void (*came_vector_moment)(const void* g, int gt, float* v, int64_t lo, int64_t hi, float beta2, float one_minus_beta2, float eps1);
  double (*came_sumsq_segment)(const void* g, int gt, int64_t off, int64_t len, float rowf, const float* colf);
  double (*came_sumsq_elem)(const void* g, int gt, const float* v, int64_t lo, int64_t hi);
  // `bits` (may be null) receives the mask m * g > 0; `mask` (may be null) replaces reading g.
  double (*came_momentum_segment)(const void* g, int gt, float* m, int64_t off, int64_t len, float rowf, const float* colf,
                                  const CameMomentumParams& a, float* col_acc, int64_t* count, MaskBits* bits);
  int64_t (*came_momentum_elem)(const void* g, int gt, float* m, const float* v, int64_t lo, int64_t hi, const CameMomentumParams& a,
                                MaskBits* bits);
  void (*came_apply_segment)(void* p, int pt, const void* g, int gt, const float* m, int64_t off, int64_t len, float rowf,
                             const float* colf, const CameApplyParams& a, const uint8_t* mask);
  // came_apply_segment over two segments of one length in step (off, rowf, colf: one entry each).
  void (*came_apply_pair)(void* p, int pt, const void* g, int gt, const float* m, const int64_t* off, int64_t len, const float* rowf,
                          const float* const* colf, const CameApplyParams& a, const uint8_t* mask);
  void (*came_apply_elem)(void* p, int pt, const void* g, int gt, const float* m, const float* v, int64_t lo, int64_t hi,
                          const CameApplyParams& a, const uint8_t* mask);
};

// Defined by kernels_scalar.cpp (always), kernels_avx2.cpp and kernels_avx512.cpp (x86-64 only).
extern const KernelTable scalar_table;
extern const KernelTable avx2_table;
extern const KernelTable avx512_table;
bool avx2_compiled();
bool avx512_compiled();

}  // namespace dist_cautious_cpu
