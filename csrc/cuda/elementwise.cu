// Elementwise multi-tensor kernels: CautiousAdamW and CautiousLion (mask counts + fused apply)
// and CAME on 1-D / 0-D fragments. One launch covers a whole list of flat tensors; each block
// owns one kChunk-element chunk of one tensor and walks it kThreads * kIlp elements at a time,
// issuing kIlp independent loads per array before any arithmetic (instruction-level parallelism).
//
// Formulas follow dist_cautious/kernels/reference.py op by op (see dc_kernels.h).

#include <algorithm>
#include <type_traits>

#include "dc_device.cuh"

namespace dist_cautious {
namespace {

constexpr int kIlp = 4;

struct NoAcc {};

// The loop shared by every elementwise op: load kIlp elements, then compute and store them.
template <typename Op>
__device__ __forceinline__ void ilp_loop(int64_t begin, int64_t end, Op& op) {
  for (int64_t base = begin; base < end; base += (int64_t)kThreads * kIlp) {
    typename Op::Regs regs[kIlp];
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + threadIdx.x + (int64_t)k * kThreads;
      if (i < end) op.load(i, regs[k]);
    }
#pragma unroll
    for (int k = 0; k < kIlp; ++k) {
      const int64_t i = base + threadIdx.x + (int64_t)k * kThreads;
      if (i < end) op.compute(i, regs[k]);
    }
  }
}

// Ops that read or write the param are instantiated for every param dtype; the others only
// for every grad dtype (specialised below, after the ops).
template <template <typename, typename> class Op>
struct UsesParam {
  static constexpr bool value = false;
};

// One block per chunk: find the tensor, run Op over the chunk, reduce Op's accumulator if any.
template <template <typename, typename> class Op, typename Args>
__global__ void __launch_bounds__(kThreads) elem_kernel(const ElemDesc* __restrict__ descs, int count, Args args) {
  const int t = find_desc(descs, count, (int64_t)blockIdx.x);
  const ElemDesc d = descs[t];
  const int64_t begin = ((int64_t)blockIdx.x - d.first_block) * kChunk;
  const int64_t end = begin + kChunk < d.n ? begin + kChunk : d.n;
  using Acc = typename Op<float, float>::Acc;
  Acc acc{};
  constexpr bool uses_param = UsesParam<Op>::value;
  DC_DISPATCH_TYPES_MAYBE(uses_param, d.param_dtype, d.grad_dtype, {
    Op<PT, GT> op(d, args);
    ilp_loop(begin, end, op);
    acc = op.acc;
  });
  if constexpr (!std::is_same<Acc, NoAcc>::value) {
    __shared__ Acc shared[kThreads / 32];
    const Acc total = block_sum(acc, shared);
    if (threadIdx.x == 0) Op<float, float>::publish(d, args, total);
  }
}

template <template <typename, typename> class Op, typename Args>
cudaError_t launch(const ElemDesc* descs, int count, int64_t blocks, const Args& args, cudaStream_t stream) {
  if (count <= 0 || blocks <= 0) return cudaSuccess;
  if (blocks > 0x7fffffffLL) return cudaErrorInvalidConfiguration;
  DC_LAUNCH((unsigned)blocks, kThreads, 0, stream, elem_kernel<Op, Args>)(descs, count, args);
  return cudaGetLastError();
}

// ---- mask counts of lerp(m, g, w) * g > 0 (AdamW) or sign(lerp(m, g, w)) * g > 0 (Lion) ----
struct CountArgs {
  float weight;
  bool lion;
  unsigned long long* counts;
};

template <typename PT, typename GT>
struct CountOp {
  using Acc = unsigned long long;
  struct Regs { float g, m; };
  const GT* grad;
  const float* m;
  CountArgs a;
  Acc acc = 0;
  __device__ CountOp(const ElemDesc& d, const CountArgs& args)
      : grad(static_cast<const GT*>(d.grad)), m(d.exp_avg), a(args) {}
  __device__ void load(int64_t i, Regs& r) { r.g = Elem<GT>::load(grad, i); r.m = m[i]; }
  __device__ void compute(int64_t, const Regs& r) {
    float update = torch_lerp(r.m, r.g, a.weight);
    if (a.lion) update = torch_sign(update);
    acc += agrees(update, r.g) ? 1ull : 0ull;
  }
  static __device__ void publish(const ElemDesc& d, const CountArgs& args, Acc total) {
    atomicAdd(args.counts + d.out_index, total);
  }
};

// ---- AdamW apply, in torch.optim.AdamW's op order ----------------------------------------
struct AdamWArgs {
  float lerp_weight, beta2, one_minus_beta2, eps;
  const float* scales;
  const float* step_scalars;  // may be null: the descriptor's alpha, inv_bc2_sqrt, decay
};

template <typename PT, typename GT>
struct AdamWOp {
  using Acc = NoAcc;
  struct Regs { float p, g, m, v; };
  PT* param;
  const GT* grad;
  float* m;
  float* v;
  AdamWArgs a;
  float alpha, inv_bc2, decay, scale;
  Acc acc{};
  __device__ AdamWOp(const ElemDesc& d, const AdamWArgs& args)
      : param(static_cast<PT*>(d.param)), grad(static_cast<const GT*>(d.grad)), m(d.exp_avg), v(d.exp_avg_sq),
        a(args), alpha(step_scalar(args.step_scalars, d.out_index, kAlphaColumn, d.alpha)),
        inv_bc2(step_scalar(args.step_scalars, d.out_index, kInvBc2SqrtColumn, d.inv_bc2_sqrt)),
        decay(step_scalar(args.step_scalars, d.out_index, kDecayColumn, d.decay)), scale(args.scales ? args.scales[d.out_index] : 1.0f) {}
  __device__ void load(int64_t i, Regs& r) {
    r.p = Elem<PT>::load(param, i); r.g = Elem<GT>::load(grad, i); r.m = m[i]; r.v = v[i];
  }
  __device__ void compute(int64_t i, const Regs& r) {
    const float p = __fmul_rn(r.p, decay);                                    // p *= 1 - lr*wd
    const float m_new = torch_lerp(r.m, r.g, a.lerp_weight);                  // m.lerp_(g, 1-b1)
    const float v_new = __fmaf_rn(a.one_minus_beta2, __fmul_rn(r.g, r.g), __fmul_rn(r.v, a.beta2));
    const float denom = __fadd_rn(__fmul_rn(__fsqrt_rn(v_new), inv_bc2), a.eps);
    float numerator = m_new;
    if (a.scales) numerator = agrees(m_new, r.g) ? __fmul_rn(m_new, scale) : 0.0f;
    m[i] = m_new;
    v[i] = v_new;
    Elem<PT>::store(param, i, __fmaf_rn(alpha, __fdiv_rn(numerator, denom), p));
  }
};

// ---- Lion apply; the momentum is never masked ---------------------------------------------
struct LionArgs {
  float weight1, weight2;
  const float* scales;
  const float* step_scalars;  // may be null: the descriptor's decay, neg_lr
};

template <typename PT, typename GT>
struct LionOp {
  using Acc = NoAcc;
  struct Regs { float p, g, m; };
  PT* param;
  const GT* grad;
  float* m;
  LionArgs a;
  float decay, neg_lr, scale;
  Acc acc{};
  __device__ LionOp(const ElemDesc& d, const LionArgs& args)
      : param(static_cast<PT*>(d.param)), grad(static_cast<const GT*>(d.grad)), m(d.exp_avg), a(args),
        decay(step_scalar(args.step_scalars, d.out_index, kDecayColumn, d.decay)),
        neg_lr(step_scalar(args.step_scalars, d.out_index, kNegLrColumn, d.neg_lr)), scale(args.scales ? args.scales[d.out_index] : 1.0f) {}
  __device__ void load(int64_t i, Regs& r) { r.p = Elem<PT>::load(param, i); r.g = Elem<GT>::load(grad, i); r.m = m[i]; }
  __device__ void compute(int64_t i, const Regs& r) {
    const float p = __fmul_rn(r.p, decay);
    float update = torch_sign(torch_lerp(r.m, r.g, a.weight1));
    if (a.scales) update = agrees(update, r.g) ? __fmul_rn(update, scale) : 0.0f;
    Elem<PT>::store(param, i, __fmaf_rn(neg_lr, update, p));
    m[i] = torch_lerp(r.m, r.g, a.weight2);
  }
};

// ---- CAME, 1-D: v = beta2 v + (1 - beta2)(g^2 + eps1) -------------------------------------
struct VecMomentArgs {
  float beta2, one_minus_beta2, eps1;
};

template <typename PT, typename GT>
struct VecMomentOp {
  using Acc = NoAcc;
  struct Regs { float g, v; };
  const GT* grad;
  float* v;
  VecMomentArgs a;
  Acc acc{};
  __device__ VecMomentOp(const ElemDesc& d, const VecMomentArgs& args)
      : grad(static_cast<const GT*>(d.grad)), v(d.exp_avg_sq), a(args) {}
  __device__ void load(int64_t i, Regs& r) { r.g = Elem<GT>::load(grad, i); r.v = v[i]; }
  __device__ void compute(int64_t i, const Regs& r) {
    const float q = __fadd_rn(__fmul_rn(r.g, r.g), a.eps1);
    v[i] = __fmaf_rn(a.one_minus_beta2, q, __fmul_rn(r.v, a.beta2));
  }
};

// The 1-D preconditioner: rsqrt(v) * x, or x itself when there is no v (the identity).
__device__ __forceinline__ float vec_precondition(const float* v, int64_t i, float x) {
  return v ? __fmul_rn(rsqrtf(v[i]), x) : x;
}

// ---- CAME, 1-D: sum of squares of rsqrt(v) * g --------------------------------------------
struct VecSumsqArgs {
  double* partials;  // one per block; summed per tensor in block order afterwards
};

template <typename PT, typename GT>
struct VecSumsqOp {
  using Acc = double;
  struct Regs { float g; };
  const GT* grad;
  const float* v;
  Acc acc = 0.0;
  __device__ VecSumsqOp(const ElemDesc& d, const VecSumsqArgs&) : grad(static_cast<const GT*>(d.grad)), v(d.exp_avg_sq) {}
  __device__ void load(int64_t i, Regs& r) { r.g = Elem<GT>::load(grad, i); }
  __device__ void compute(int64_t i, const Regs& r) {
    const float u = vec_precondition(v, i, r.g);
    acc += (double)__fmul_rn(u, u);
  }
  static __device__ void publish(const ElemDesc&, const VecSumsqArgs& args, Acc total) {
    args.partials[blockIdx.x] = total;
  }
};

// ---- CAME, 1-D: momentum of the clipped update, and the mask count ------------------------
struct VecMomentumArgs {
  const float* divisors;
  float beta1, one_minus_beta1;
  unsigned long long* counts;
};

template <typename PT, typename GT>
struct VecMomentumOp {
  using Acc = unsigned long long;
  struct Regs { float g, m; };
  const GT* grad;
  const float* v;
  float* m;
  VecMomentumArgs a;
  float divisor;
  Acc acc = 0;
  __device__ VecMomentumOp(const ElemDesc& d, const VecMomentumArgs& args)
      : grad(static_cast<const GT*>(d.grad)), v(d.exp_avg_sq), m(d.exp_avg), a(args), divisor(args.divisors[d.out_index]) {}
  __device__ void load(int64_t i, Regs& r) { r.g = Elem<GT>::load(grad, i); r.m = m[i]; }
  __device__ void compute(int64_t i, const Regs& r) {
    const float update = __fdiv_rn(vec_precondition(v, i, r.g), divisor);
    const float m_new = __fmaf_rn(a.one_minus_beta1, update, __fmul_rn(r.m, a.beta1));
    m[i] = m_new;
    acc += agrees(m_new, r.g) ? 1ull : 0ull;
  }
  static __device__ void publish(const ElemDesc& d, const VecMomentumArgs& args, Acc total) {
    atomicAdd(args.counts + d.out_index, total);
  }
};

// ---- CAME, 1-D: the final (masked) update -------------------------------------------------
struct VecApplyArgs {
  const float* scales;
  const float* step_scalars;  // may be null: the descriptor's decay, neg_lr
};

template <typename PT, typename GT>
struct VecApplyOp {
  using Acc = NoAcc;
  struct Regs { float p, g, m; };
  PT* param;
  const GT* grad;
  const float* v;
  const float* m;
  VecApplyArgs a;
  float decay, neg_lr, scale;
  Acc acc{};
  __device__ VecApplyOp(const ElemDesc& d, const VecApplyArgs& args)
      : param(static_cast<PT*>(d.param)), grad(static_cast<const GT*>(d.grad)), v(d.exp_avg_sq), m(d.exp_avg), a(args),
        decay(step_scalar(args.step_scalars, d.out_index, kDecayColumn, d.decay)),
        neg_lr(step_scalar(args.step_scalars, d.out_index, kNegLrColumn, d.neg_lr)), scale(args.scales ? args.scales[d.out_index] : 1.0f) {}
  __device__ void load(int64_t i, Regs& r) {
    r.p = Elem<PT>::load(param, i); r.m = m[i];
    r.g = a.scales ? Elem<GT>::load(grad, i) : 0.0f;
  }
  __device__ void compute(int64_t i, const Regs& r) {
    float update = vec_precondition(v, i, r.m);
    if (a.scales) update = agrees(r.m, r.g) ? __fmul_rn(update, scale) : 0.0f;
    const float p = __fmul_rn(r.p, decay);
    Elem<PT>::store(param, i, __fmaf_rn(neg_lr, update, p));
  }
};

template <>
struct UsesParam<AdamWOp> {
  static constexpr bool value = true;
};
template <>
struct UsesParam<LionOp> {
  static constexpr bool value = true;
};
template <>
struct UsesParam<VecApplyOp> {
  static constexpr bool value = true;
};

}  // namespace

int64_t dc_prepare_elem(ElemDesc* descs, int count) {
  int64_t blocks = 0;
  for (int t = 0; t < count; ++t) {
    descs[t].first_block = blocks;
    blocks += (descs[t].n + kChunk - 1) / kChunk;
  }
  return blocks;
}

cudaError_t launch_lerp_mask_counts(const ElemDesc* descs, int count, int64_t blocks, float weight, bool lion,
                                    unsigned long long* counts, cudaStream_t stream) {
  return launch<CountOp>(descs, count, blocks, CountArgs{weight, lion, counts}, stream);
}

cudaError_t launch_adamw_apply(const ElemDesc* descs, int count, int64_t blocks, float lerp_weight, float beta2,
                               float one_minus_beta2, float eps, const float* scales, const float* step_scalars,
                               cudaStream_t stream) {
  return launch<AdamWOp>(descs, count, blocks, AdamWArgs{lerp_weight, beta2, one_minus_beta2, eps, scales, step_scalars}, stream);
}

cudaError_t launch_lion_apply(const ElemDesc* descs, int count, int64_t blocks, float weight1, float weight2,
                              const float* scales, const float* step_scalars, cudaStream_t stream) {
  return launch<LionOp>(descs, count, blocks, LionArgs{weight1, weight2, scales, step_scalars}, stream);
}

cudaError_t launch_came_vector_second_moment(const ElemDesc* descs, int count, int64_t blocks, float beta2,
                                             float one_minus_beta2, float eps1, cudaStream_t stream) {
  return launch<VecMomentOp>(descs, count, blocks, VecMomentArgs{beta2, one_minus_beta2, eps1}, stream);
}

cudaError_t launch_came_vector_sumsq(const ElemDesc* descs, int count, int64_t blocks, double* sums,
                                     double* partials, cudaStream_t stream) {
  const cudaError_t error = launch<VecSumsqOp>(descs, count, blocks, VecSumsqArgs{partials}, stream);
  if (error != cudaSuccess || count <= 0 || blocks <= 0) return error;
  return launch_sum_block_partials(descs, count, blocks, partials, sums, stream);
}

cudaError_t launch_came_vector_momentum(const ElemDesc* descs, int count, int64_t blocks, const float* divisors,
                                        float beta1, float one_minus_beta1, unsigned long long* counts,
                                        cudaStream_t stream) {
  return launch<VecMomentumOp>(descs, count, blocks, VecMomentumArgs{divisors, beta1, one_minus_beta1, counts}, stream);
}

cudaError_t launch_came_vector_apply(const ElemDesc* descs, int count, int64_t blocks, const float* scales,
                                     const float* step_scalars, cudaStream_t stream) {
  return launch<VecApplyOp>(descs, count, blocks, VecApplyArgs{scales, step_scalars}, stream);
}

}  // namespace dist_cautious
