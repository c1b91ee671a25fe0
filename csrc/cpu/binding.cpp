// The torch binding of the CPU kernels: checks tensors, picks the instruction set once (AVX-512,
// AVX2 or scalar, by what the CPU reports; `set_isa` forces one for tests), splits each tensor
// into fixed tiles run with OpenMP, and reduces per-tile partial sums in tile order (so counts
// and sums do not depend on the thread count). The Python wrapper (dist_cautious/kernels/
// cpu_ops.py) turns the reference signatures into these calls.
#include <torch/extension.h>
#include <torch/library.h>

#include <algorithm>
#include <functional>
#include <cmath>
#include <string>
#include <vector>

#include <ATen/Parallel.h>

#include "came_factors.h"
#include "kernels_api.h"
#include "step_scalars.h"

namespace dc = dist_cautious_cpu;
using at::Tensor;
using OptTensor = c10::optional<Tensor>;

namespace {

constexpr int64_t kTile = 1 << 15;         // elements per work item (128 KiB of each fp32 stream)
// A large matrix's rows are split into at most this many blocks of at least one tile each, each
// with a private double column accumulator (fixed by the sizes, not the thread count, so the
// sums are the same for any number of threads).
constexpr int64_t kMaxBlocksPerMatrix = 16;

bool cpu_supports(const std::string& isa) {
#if defined(__x86_64__) && defined(__GNUC__)
  __builtin_cpu_init();
  if (isa == "avx512") return dc::avx512_compiled() && __builtin_cpu_supports("avx512f");
  if (isa == "avx2") return dc::avx2_compiled() && __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c");
#endif
  return isa == "scalar";
}

const dc::KernelTable* table_for(const std::string& isa) {
  if (isa == "avx512") return &dc::avx512_table;
  if (isa == "avx2") return &dc::avx2_table;
  return &dc::scalar_table;
}

const dc::KernelTable* best_table() {
  for (const char* isa : {"avx512", "avx2"})
    if (cpu_supports(isa)) return table_for(isa);
  return &dc::scalar_table;
}

const dc::KernelTable*& active() {
  static const dc::KernelTable* table = best_table();
  return table;
}

std::vector<std::string> available_isas() {
  std::vector<std::string> out;
  for (const char* isa : {"avx512", "avx2", "scalar"})
    if (cpu_supports(isa)) out.emplace_back(isa);
  return out;
}

void set_isa(const std::string& isa) {
  if (isa == "auto") {
    active() = best_table();
    return;
  }
  TORCH_CHECK(isa == "avx512" || isa == "avx2" || isa == "scalar", "unknown ISA '", isa, "': expected auto, avx512, avx2 or scalar");
  TORCH_CHECK(cpu_supports(isa), "ISA '", isa, "' is not supported by this CPU or build");
  active() = table_for(isa);
}

std::string current_isa() { return active()->name; }

int dtype_code(const Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return dc::kF32;
    case at::kBFloat16: return dc::kBF16;
    case at::kHalf: return dc::kF16;
    default: TORCH_CHECK(false, what, ": expected float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return dc::kF32;
}

void check_flat(const Tensor& t, int64_t n, const char* what) {
  TORCH_CHECK(t.device().is_cpu(), what, " must be a CPU tensor");
  TORCH_CHECK(t.is_contiguous(), what, " must be contiguous");
  TORCH_CHECK(t.numel() == n, what, " has ", t.numel(), " elements, expected ", n);
}

float* state_ptr(const Tensor& t, int64_t n, const char* what) {
  check_flat(t, n, what);
  TORCH_CHECK(t.scalar_type() == at::kFloat, what, " (optimizer state) must be float32");
  return t.data_ptr<float>();
}

void check_lists(size_t n, std::initializer_list<size_t> sizes) {
  for (size_t s : sizes) TORCH_CHECK(s == n, "tensor lists differ in length: ", s, " vs ", n);
}

dc::Lerp lerp_weight(double weight) {
  float w = static_cast<float>(weight);
  bool small = std::fabs(w) < 0.5f;
  return dc::Lerp{small ? w : w - 1.0f, small};
}

float scale_at(const OptTensor& scales, size_t index) {
  if (!scales.has_value()) return 1.0f;
  const Tensor& s = *scales;
  TORCH_CHECK(s.device().is_cpu() && s.scalar_type() == at::kFloat && s.dim() == 1 && static_cast<size_t>(s.numel()) > index,
              "scales must be a float32 CPU vector with one entry per tensor");
  return s.contiguous().data_ptr<float>()[index];
}

int threads() { return std::max(1, at::get_num_threads()); }

// Run f(tile, lo, hi) over fixed tiles of [0, n); parallel when there is more than one tile.
// Dynamic scheduling: on a shared or oversubscribed machine a descheduled thread does not hold
// the whole step back (a static split waits for the slowest thread); a tile is 128 KiB of each
// stream, so handing tiles out one at a time costs nothing measurable.
template <class F>
void for_tiles(int64_t n, F&& f) {
  const int64_t tiles = (n + kTile - 1) / kTile;
  if (tiles <= 1) {
    if (n > 0) f(0, 0, n);
    return;
  }
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads())
  for (int64_t t = 0; t < tiles; ++t) f(t, t * kTile, std::min(n, (t + 1) * kTile));
}

int64_t count_tiles(int64_t n, const std::function<int64_t(int64_t, int64_t)>& f) {
  std::vector<int64_t> partial(std::max<int64_t>(1, (n + kTile - 1) / kTile), 0);
  for_tiles(n, [&](int64_t t, int64_t lo, int64_t hi) { partial[t] = f(lo, hi); });
  int64_t total = 0;
  for (int64_t c : partial) total += c;
  return total;
}

double sum_tiles(int64_t n, const std::function<double(int64_t, int64_t)>& f) {
  std::vector<double> partial(std::max<int64_t>(1, (n + kTile - 1) / kTile), 0.0);
  for_tiles(n, [&](int64_t t, int64_t lo, int64_t hi) { partial[t] = f(lo, hi); });
  double total = 0.0;
  for (double c : partial) total += c;
  return total;
}

// Where the local range [0, n) of a flat range starting at global element `start` of a
// (*batch, R, C) tensor meets its rows.
struct Layout {
  int64_t start, rows, cols;  // rows = R (per matrix), cols = C
};

// Visit the row segments of local [lo, hi): f(global row, first column, local offset, length).
template <class F>
void for_segments(const Layout& l, int64_t lo, int64_t hi, F&& f) {
  for (int64_t a = lo; a < hi;) {
    const int64_t k = l.start + a;
    const int64_t row = k / l.cols, c0 = k % l.cols;
    const int64_t len = std::min(hi - a, l.cols - c0);
    f(row, c0, a, len);
    a += len;
  }
}

// Visit [a, a + len) and [b, b + len) in step, in pieces that lie within one row of each:
// f(row_a, c0_a, off_a, row_b, c0_b, off_b, piece length).
template <class F>
void for_segment_pairs(const Layout& l, int64_t a, int64_t b, int64_t len, F&& f) {
  for (const int64_t end = a + len; a < end;) {
    const int64_t ka = l.start + a, kb = l.start + b;
    const int64_t piece = std::min({end - a, l.cols - ka % l.cols, l.cols - kb % l.cols});
    f(ka / l.cols, ka % l.cols, a, kb / l.cols, kb % l.cols, b, piece);
    a += piece;
    b += piece;
  }
}

// Rows whose column contributions are added in fp32 before they go into the double accumulator.
constexpr int64_t kColRun = 64;

// What one row block of a pass counts, and the mask bits it keeps (when `mask_words` is given).
struct BlockOut {
  int64_t count = 0;
  dc::MaskBits bits;
};

// How a row block of walk_row_col_sums walks its rows: segment(row, c0, off, len, col_acc, out)
// processes one row segment, adds into col_acc[0..len) (fp32, starting at column c0) and, when a
// second column output is given, into col_acc[C..C + len), and returns the segment's row sum.
// A walker whose group() is positive takes whole rows through rows() instead, up to group() (at
// most kMaxGroup) consecutive whole rows of one run at once: rows(row, count, off, run, out,
// sums), the rows' sums into sums[0..count). settle(run) ends what it has left pending in `run`
// before the run is flushed. Each block makes its own walker. SegmentWalker: one segment at a
// time, through a stateless `seg`; its rows() is never called.
constexpr int64_t kMaxGroup = dc::kCameSqRows;

template <class Seg>
struct SegmentWalker {
  Seg& seg;
  int64_t group() const { return 0; }
  double segment(int64_t row, int64_t c0, int64_t off, int64_t len, float* col_acc, BlockOut* out) { return seg(row, c0, off, len, col_acc, out); }
  void rows(int64_t, int64_t, int64_t, float*, BlockOut*, double*) {}
  void settle(float*) {}
};

// Partial row and column sums over a factored fragment, each row block walked by its own walker
// from make_walker() (see SegmentWalker). Rows are never split between blocks. Column
// contributions are added in fp32 over runs of at most kColRun rows of one matrix, then into a
// per-block double accumulator, and blocks are added in block order: the result is independent
// of the thread count, and each fp32 run carries a relative error of at most kColRun * 2^-24.
// Returns the sum of the per-block counts; each block flushes its mask bits into `mask_words`
// (may be null).
template <class MakeWalker>
int64_t walk_row_col_sums(const Layout& l, int64_t n, float* row_sums, float* col_sums, MakeWalker&& make_walker, uint64_t* mask_words,
                          float* col_sums2) {
  if (n == 0) return 0;
  const int64_t R = l.rows, C = l.cols;
  const int64_t K = col_sums2 != nullptr ? 2 : 1, S = K * C;  // column outputs; accumulator stride per matrix
  float* const outputs[2] = {col_sums, col_sums2};
  const int64_t g0 = l.start / C, g1 = (l.start + n - 1) / C;  // global rows, inclusive
  const int64_t m0 = g0 / R, m1 = g1 / R;                      // matrices, inclusive
  auto run_rows = [&](int64_t ra, int64_t rb, int64_t first_matrix, double* col_acc, BlockOut* out) {
    out->bits.words = mask_words;
    out->bits.owned_from = std::max(l.start, ra * C) - l.start;
    auto walker = make_walker();
    const int64_t group = std::min(walker.group(), kMaxGroup);
    std::vector<float> run(S, 0.0f);
    int64_t run_matrix = ra / R, rows_in_run = 0;
    auto flush = [&]() {
      walker.settle(run.data());
      double* acc = col_acc + (run_matrix - first_matrix) * S;
      for (int64_t c = 0; c < S; ++c) acc[c] += static_cast<double>(run[c]);
      std::fill(run.begin(), run.end(), 0.0f);
      rows_in_run = 0;
    };
    auto add_row_sum = [&](int64_t row, double sum) { row_sums[row] = static_cast<float>(static_cast<double>(row_sums[row]) + sum); };
    const int64_t whole_end = (l.start + n) / C;  // rows before it end inside the fragment
    for (int64_t row = ra; row <= rb;) {
      if (row / R != run_matrix || rows_in_run == kColRun) {
        flush();
        run_matrix = row / R;
      }
      const int64_t a = std::max(l.start, row * C), b = std::min(l.start + n, (row + 1) * C);
      const int64_t c0 = a - row * C;
      if (group > 0 && b - a == C) {
        const int64_t count = std::min({group, kColRun - rows_in_run, (run_matrix + 1) * R - row, rb + 1 - row, whole_end - row});
        double sums[kMaxGroup];
        walker.rows(row, count, a - l.start, run.data(), out, sums);
        for (int64_t k = 0; k < count; ++k) add_row_sum(row + k, sums[k]);
        row += count;
        rows_in_run += count;
      } else {
        add_row_sum(row, walker.segment(row, c0, a - l.start, b - a, run.data() + c0, out));
        ++row;
        ++rows_in_run;
      }
    }
    flush();
    out->bits.flush();
  };
  auto add_into = [&](int64_t k, int64_t mat, int64_t c, double value) {
    float* o = outputs[k] + mat * C + c;
    *o = static_cast<float>(static_cast<double>(*o) + value);
  };
  if (R * C <= kTile) {
    // Small matrices: each block owns whole matrices, so no two blocks share a column sum.
    const int64_t per_block = std::max<int64_t>(1, kTile / (R * C));
    const int64_t blocks = (m1 - m0 + per_block) / per_block;
    std::vector<BlockOut> outs(blocks);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads()) if (blocks > 1)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t ma = m0 + b * per_block, mb = std::min(m1, ma + per_block - 1);
      std::vector<double> acc((mb - ma + 1) * S, 0.0);
      run_rows(std::max(g0, ma * R), std::min(g1, mb * R + R - 1), ma, acc.data(), &outs[b]);
      for (int64_t mat = ma; mat <= mb; ++mat)
        for (int64_t k = 0; k < K; ++k)
          for (int64_t c = 0; c < C; ++c) add_into(k, mat, c, acc[(mat - ma) * S + k * C + c]);
    }
    int64_t total = 0;
    for (const BlockOut& o : outs) total += o.count;
    return total;
  }
  // Large matrices: split each matrix's rows into blocks with private column accumulators.
  int64_t total = 0;
  for (int64_t mat = m0; mat <= m1; ++mat) {
    const int64_t ra = std::max(g0, mat * R), rb = std::min(g1, mat * R + R - 1);
    const int64_t nr = rb - ra + 1;
    const int64_t blocks = std::max<int64_t>(1, std::min({nr, kMaxBlocksPerMatrix, nr * C / kTile}));
    std::vector<double> acc(blocks * S, 0.0);
    std::vector<BlockOut> outs(blocks);
#pragma omp parallel for schedule(dynamic, 1) num_threads(threads()) if (blocks > 1)
    for (int64_t b = 0; b < blocks; ++b) {
      const int64_t lo = ra + nr * b / blocks, hi = ra + nr * (b + 1) / blocks - 1;
      run_rows(lo, hi, mat, acc.data() + b * S, &outs[b]);
    }
    // Each column's block sums added in block order, a chunk of columns at a time: block by block
    // over the chunk (sequential reads, vectorised) rather than column by column down the blocks
    // (a strided, serial walk that measured about a tenth of phase 1's time at 2048 columns).
    constexpr int64_t kChunk = 1024;
#pragma omp parallel for schedule(static) num_threads(threads()) if (S >= kTile)
    for (int64_t c0 = 0; c0 < S; c0 += kChunk) {
      const int64_t len = std::min(kChunk, S - c0);
      double sum[kChunk] = {};
      for (int64_t b = 0; b < blocks; ++b) {
        const double* from = acc.data() + b * S + c0;
        for (int64_t c = 0; c < len; ++c) sum[c] += from[c];
      }
      for (int64_t c = 0; c < len; ++c) add_into((c0 + c) / C, mat, (c0 + c) % C, sum[c]);
    }
    for (const BlockOut& o : outs) total += o.count;
  }
  return total;
}

// walk_row_col_sums with every row segment walked by `seg` (see SegmentWalker).
template <class Seg>
int64_t row_col_sums(const Layout& l, int64_t n, float* row_sums, float* col_sums, Seg&& seg, uint64_t* mask_words = nullptr) {
  return walk_row_col_sums(l, n, row_sums, col_sums, [&] { return SegmentWalker<Seg>{seg}; }, mask_words, nullptr);
}

Tensor as_counts(const std::vector<int64_t>& counts) {
  Tensor out = torch::empty({static_cast<int64_t>(counts.size())}, torch::kFloat32);
  float* o = out.data_ptr<float>();
  for (size_t i = 0; i < counts.size(); ++i) o[i] = static_cast<float>(counts[i]);
  return out;
}

// ---------------------------------------------------------------- AdamW / Lion ----------------

Tensor elementwise_counts(bool lion, const std::vector<Tensor>& grads, const std::vector<Tensor>& exp_avgs, double weight) {
  check_lists(grads.size(), {exp_avgs.size()});
  const auto* k = active();
  const dc::Lerp w = lerp_weight(weight);
  std::vector<int64_t> counts(grads.size(), 0);
  for (size_t i = 0; i < grads.size(); ++i) {
    const int64_t n = grads[i].numel();
    check_flat(grads[i], n, "grad");
    const int gt = dtype_code(grads[i], "grad");
    const void* g = grads[i].data_ptr();
    const float* m = state_ptr(exp_avgs[i], n, "exp_avg");
    auto fn = lion ? k->lion_count : k->adamw_count;
    counts[i] = count_tiles(n, [&](int64_t lo, int64_t hi) { return fn(g, gt, m, lo, hi, w); });
  }
  return as_counts(counts);
}

Tensor adamw_mask_counts(const std::vector<Tensor>& grads, const std::vector<Tensor>& exp_avgs, double weight) {
  return elementwise_counts(false, grads, exp_avgs, weight);
}

Tensor lion_mask_counts(const std::vector<Tensor>& grads, const std::vector<Tensor>& exp_avgs, double weight) {
  return elementwise_counts(true, grads, exp_avgs, weight);
}

void adamw_apply(const std::vector<Tensor>& params, const std::vector<Tensor>& grads, const std::vector<Tensor>& exp_avgs,
                 const std::vector<Tensor>& exp_avg_sqs, const std::vector<double>& neg_step_sizes, const std::vector<double>& sqrt_bc2s,
                 const std::vector<double>& decays, double m_weight, double beta2, double one_minus_beta2, double eps, const OptTensor& scales) {
  check_lists(params.size(), {grads.size(), exp_avgs.size(), exp_avg_sqs.size(), neg_step_sizes.size(), sqrt_bc2s.size(), decays.size()});
  const auto* k = active();
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    check_flat(params[i], n, "param");
    check_flat(grads[i], n, "grad");
    dc::AdamParams a{static_cast<float>(decays[i]),
                     lerp_weight(m_weight),
                     static_cast<float>(beta2),
                     static_cast<float>(one_minus_beta2),
                     static_cast<float>(sqrt_bc2s[i]),
                     static_cast<float>(eps),
                     static_cast<float>(neg_step_sizes[i]),
                     scales.has_value(),
                     scale_at(scales, i)};
    void* p = params[i].data_ptr();
    const int pt = dtype_code(params[i], "param"), gt = dtype_code(grads[i], "grad");
    const void* g = grads[i].data_ptr();
    float* m = state_ptr(exp_avgs[i], n, "exp_avg");
    float* v = state_ptr(exp_avg_sqs[i], n, "exp_avg_sq");
    for_tiles(n, [&](int64_t, int64_t lo, int64_t hi) { k->adamw_apply(p, pt, g, gt, m, v, lo, hi, a); });
  }
}

void lion_apply(const std::vector<Tensor>& params, const std::vector<Tensor>& grads, const std::vector<Tensor>& exp_avgs,
                const std::vector<double>& decays, double update_weight, double m_weight, const std::vector<double>& neg_lrs,
                const OptTensor& scales) {
  check_lists(params.size(), {grads.size(), exp_avgs.size(), decays.size(), neg_lrs.size()});
  const auto* k = active();
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    check_flat(params[i], n, "param");
    check_flat(grads[i], n, "grad");
    dc::LionParams a{static_cast<float>(decays[i]), lerp_weight(update_weight), lerp_weight(m_weight), static_cast<float>(neg_lrs[i]),
                     scales.has_value(), scale_at(scales, i)};
    void* p = params[i].data_ptr();
    const int pt = dtype_code(params[i], "param"), gt = dtype_code(grads[i], "grad");
    const void* g = grads[i].data_ptr();
    float* m = state_ptr(exp_avgs[i], n, "exp_avg");
    for_tiles(n, [&](int64_t, int64_t lo, int64_t hi) { k->lion_apply(p, pt, g, gt, m, lo, hi, a); });
  }
}

// Cautious Lion in two passes (see kernels.h): `codes[i]` is a uint8 buffer of lion_code_bytes(n)
// bytes that the first pass fills and the second reads: 2 bytes per 8 elements, rounded up to 8
// bytes so that buffers cut from one allocation stay 8-byte aligned.
int64_t lion_code_bytes(int64_t n) { return (n + 31) / 32 * 8; }

// A scratch byte buffer (Lion's codes, CAME's mask bits) of at least `bytes` bytes, 8-byte aligned.
uint8_t* scratch_ptr(const Tensor& t, int64_t bytes, const char* what) {
  TORCH_CHECK(t.device().is_cpu() && t.is_contiguous() && t.scalar_type() == at::kByte, what, " must be a contiguous uint8 CPU tensor");
  TORCH_CHECK(t.numel() >= bytes, what, " of ", t.numel(), " bytes, needs ", bytes);
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % 8 == 0, what, " must be 8-byte aligned");
  return t.data_ptr<uint8_t>();
}

Tensor lion_encode(const std::vector<Tensor>& grads, const std::vector<Tensor>& exp_avgs, const std::vector<Tensor>& codes, double update_weight,
                   double m_weight) {
  check_lists(grads.size(), {exp_avgs.size(), codes.size()});
  const auto* k = active();
  const dc::Lerp wu = lerp_weight(update_weight), wm = lerp_weight(m_weight);
  std::vector<int64_t> counts(grads.size(), 0);
  for (size_t i = 0; i < grads.size(); ++i) {
    const int64_t n = grads[i].numel();
    check_flat(grads[i], n, "grad");
    const int gt = dtype_code(grads[i], "grad");
    const void* g = grads[i].data_ptr();
    float* m = state_ptr(exp_avgs[i], n, "exp_avg");
    uint8_t* code = scratch_ptr(codes[i], lion_code_bytes(n), "code buffer");
    counts[i] = count_tiles(n, [&](int64_t lo, int64_t hi) { return k->lion_encode(g, gt, m, code, lo, hi, wu, wm); });
  }
  return as_counts(counts);
}

void lion_decode_apply(const std::vector<Tensor>& params, const std::vector<Tensor>& codes, const std::vector<double>& decays,
                       const std::vector<double>& neg_lrs, const Tensor& scales) {
  check_lists(params.size(), {codes.size(), decays.size(), neg_lrs.size()});
  const auto* k = active();
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    check_flat(params[i], n, "param");
    void* p = params[i].data_ptr();
    const int pt = dtype_code(params[i], "param");
    const uint8_t* code = scratch_ptr(codes[i], lion_code_bytes(n), "code buffer");
    const float scale = scale_at(scales, i), decay = static_cast<float>(decays[i]), neg_lr = static_cast<float>(neg_lrs[i]);
    for_tiles(n, [&](int64_t, int64_t lo, int64_t hi) {
      k->lion_decode_apply(p, pt, code, lo, hi, decay, neg_lr, scale);
    });
  }
}

// ---------------------------------------------------------------- CAME --------------------------
// A fragment's factors arrive as (kind, start, R, C, row, col, elementwise): kind 0 = identity,
// 1 = elementwise rsqrt(v), 2 = factored row[row(i)] * col[col(i)] over the layout.
enum Kind : int64_t { kIdentity = 0, kElementwise = 1, kFactored = 2 };

struct Factors {
  int64_t kind;
  Layout layout;
  const float* row;
  const float* col;
  const float* elem;
};

Factors factors_at(size_t i, int64_t n, const std::vector<int64_t>& kinds, const std::vector<int64_t>& starts, const std::vector<int64_t>& rows,
                   const std::vector<int64_t>& cols, const std::vector<OptTensor>& row_f, const std::vector<OptTensor>& col_f,
                   const std::vector<OptTensor>& elem_f) {
  Factors f{kinds[i], Layout{starts[i], rows[i], cols[i]}, nullptr, nullptr, nullptr};
  if (f.kind == kFactored) {
    TORCH_CHECK(rows[i] > 0 && cols[i] > 0 && starts[i] >= 0, "factored layout needs R, C > 0");
    TORCH_CHECK(row_f[i].has_value() && col_f[i].has_value(), "factored fragment without row/col factors");
    const int64_t nrow = (starts[i] + n + cols[i] - 1) / cols[i];  // rows the range reaches
    TORCH_CHECK(row_f[i]->numel() >= nrow, "row factor too short for the layout");
    TORCH_CHECK(col_f[i]->numel() >= ((nrow + rows[i] - 1) / rows[i]) * cols[i], "column factor too short for the layout");
    f.row = state_ptr(*row_f[i], row_f[i]->numel(), "row factor");
    f.col = state_ptr(*col_f[i], col_f[i]->numel(), "column factor");
  } else if (f.kind == kElementwise) {
    TORCH_CHECK(elem_f[i].has_value(), "elementwise factor missing");
    f.elem = state_ptr(*elem_f[i], n, "elementwise factor");
  } else {
    TORCH_CHECK(f.kind == kIdentity, "unknown factor kind ", f.kind);
  }
  return f;
}

int& came_sq_rows_in_step() {
  static int rows = dc::kCameSqRows;
  return rows;
}

// Test hook: phase 1's whole rows per group (1: one row at a time, the walk before groups).
void set_came_sq_rows(int64_t rows) {
  TORCH_CHECK(rows >= 1 && rows <= dc::kCameSqRows, "rows in step must be 1 to ", dc::kCameSqRows, ", got ", rows);
  came_sq_rows_in_step() = static_cast<int>(rows);
}

// Phase 1's walker (walk_row_col_sums): whole rows in groups of dc::kCameSqRows through
// came_sq_rows, partial rows (where a ZeRO cut falls) one segment each. With the row state
// (`r_old`), each whole row also folds g^2 / R_i into the second column output; a group's fold is
// left pending and handed to the next came_sq_rows call (which does it in the same walk when both
// groups are full), or done by settle() before the run is flushed, so that its arithmetic overlaps
// that group's loads.
struct SqSumWalker {
  int64_t rows_in_step;  // came_sq_rows_in_step() when the pass began
  const dc::KernelTable* k;
  const void* g;
  int gt;
  int64_t cols;
  float eps1;
  const float* r_old;  // null: no fold
  float beta2, one_minus_beta2;
  int64_t pending_off = 0;  // local offset of the group whose fold is pending
  int pending_rows = 0;
  float pending_a[dc::kCameSqRows];

  int64_t group() const { return rows_in_step; }

  double segment(int64_t, int64_t, int64_t off, int64_t len, float* col_acc, BlockOut*) { return k->came_sq_segment(g, gt, off, len, eps1, col_acc); }

  void rows(int64_t row, int64_t count, int64_t off, float* run, BlockOut*, double* sums) {
    if (rows_in_step == 1) {  // the walk before row groups, kept for tests to compare with
      sums[0] = k->came_sq_segment(g, gt, off, cols, eps1, run);
      if (r_old != nullptr) k->came_fold_segment(g, gt, off, cols, 1.0f / new_row_state(row, sums[0]), run + cols);
      return;
    }
    k->came_sq_rows(g, gt, off, cols, static_cast<int>(count), eps1, run, sums, pending_off, pending_rows, pending_a, run + cols);
    pending_rows = 0;
    if (r_old == nullptr) return;
    for (int64_t i = 0; i < count; ++i) pending_a[i] = 1.0f / new_row_state(row + i, sums[i]);
    pending_off = off;
    pending_rows = static_cast<int>(count);
  }

  // R_i as the optimizer will update it; torch: rows.mul_(beta2).add_(row_sums / C, alpha=1 - beta2)
  float new_row_state(int64_t row, double sum) const {
    return std::fma(static_cast<float>(sum) / static_cast<float>(cols), one_minus_beta2, r_old[row] * beta2);
  }

  void settle(float* run) {
    for (int i = 0; i < pending_rows; ++i) k->came_fold_segment(g, gt, pending_off + i * cols, cols, pending_a[i], run + cols);
    pending_rows = 0;
  }
};

// Phase 1 of CAME over factored fragments. With `folded[i]` (a zeroed B*C buffer) and the row
// state before this step's update (`row_states[i]`), whole rows also add g^2 / R_i into folded[i]
// (R_i: the row's updated second moment, computed here as the optimizer will), so that phase 2
// needs no pass over g (came_update_sumsq with `folded`).
void came_factored_sq_sums(const std::vector<Tensor>& grads, const std::vector<int64_t>& starts, const std::vector<int64_t>& rows,
                           const std::vector<int64_t>& cols, double eps1, const std::vector<Tensor>& row_sums, const std::vector<Tensor>& col_sums,
                           const std::vector<OptTensor>& row_states, double beta2, double one_minus_beta2, const std::vector<OptTensor>& folded) {
  check_lists(grads.size(), {starts.size(), rows.size(), cols.size(), row_sums.size(), col_sums.size(), row_states.size(), folded.size()});
  const auto* k = active();
  const float e1 = static_cast<float>(eps1), b2 = static_cast<float>(beta2), omb2 = static_cast<float>(one_minus_beta2);
  for (size_t i = 0; i < grads.size(); ++i) {
    const int64_t n = grads[i].numel();
    check_flat(grads[i], n, "grad");
    const int gt = dtype_code(grads[i], "grad");
    const void* g = grads[i].data_ptr();
    const Layout l{starts[i], rows[i], cols[i]};
    float* rs = state_ptr(row_sums[i], row_sums[i].numel(), "row sums");
    float* cs = state_ptr(col_sums[i], col_sums[i].numel(), "column sums");
    TORCH_CHECK(n == 0 || row_sums[i].numel() >= (l.start + n + l.cols - 1) / l.cols, "row sums too short for the layout");
    float* fold = nullptr;
    const float* r_old = nullptr;
    if (folded[i].has_value()) {
      TORCH_CHECK(row_states[i].has_value(), "folding the sum of squares needs the row state");
      fold = state_ptr(*folded[i], col_sums[i].numel(), "folded column sums");
      r_old = state_ptr(*row_states[i], row_sums[i].numel(), "row state");
    }
    const SqSumWalker walker{came_sq_rows_in_step(), k, g, gt, l.cols, e1, r_old, b2, omb2};
    walk_row_col_sums(l, n, rs, cs, [&] { return walker; }, nullptr, fold);
  }
}

void came_vector_second_moment(const std::vector<Tensor>& grads, const std::vector<Tensor>& exp_avg_sqs, double beta2, double one_minus_beta2,
                               double eps1) {
  check_lists(grads.size(), {exp_avg_sqs.size()});
  const auto* k = active();
  for (size_t i = 0; i < grads.size(); ++i) {
    const int64_t n = grads[i].numel();
    check_flat(grads[i], n, "grad");
    const int gt = dtype_code(grads[i], "grad");
    const void* g = grads[i].data_ptr();
    float* v = state_ptr(exp_avg_sqs[i], n, "exp_avg_sq");
    for_tiles(n, [&](int64_t, int64_t lo, int64_t hi) {
      k->came_vector_moment(g, gt, v, lo, hi, static_cast<float>(beta2), static_cast<float>(one_minus_beta2), static_cast<float>(eps1));
    });
  }
}

// The sum of squares of uh = g * factors per fragment. A factored fragment with `folded[i]` (from
// came_factored_sq_sums) and its per-matrix row-state means takes its whole rows from
// mean_b * sum_j c_j^2 * folded_j and reads g only in its (at most two) partial rows.
Tensor came_update_sumsq(const std::vector<Tensor>& grads, const std::vector<int64_t>& kinds, const std::vector<int64_t>& starts,
                         const std::vector<int64_t>& rows, const std::vector<int64_t>& cols, const std::vector<OptTensor>& row_f,
                         const std::vector<OptTensor>& col_f, const std::vector<OptTensor>& elem_f, const std::vector<OptTensor>& folded,
                         const std::vector<OptTensor>& row_means) {
  check_lists(grads.size(), {kinds.size(), starts.size(), rows.size(), cols.size(), row_f.size(), col_f.size(), elem_f.size(), folded.size(),
                             row_means.size()});
  const auto* k = active();
  Tensor out = torch::empty({static_cast<int64_t>(grads.size())}, torch::kFloat32);
  for (size_t i = 0; i < grads.size(); ++i) {
    const int64_t n = grads[i].numel();
    check_flat(grads[i], n, "grad");
    const int gt = dtype_code(grads[i], "grad");
    const void* g = grads[i].data_ptr();
    const Factors f = factors_at(i, n, kinds, starts, rows, cols, row_f, col_f, elem_f);
    auto segment_sumsq = [&](int64_t row, int64_t c0, int64_t off, int64_t len) {
      return k->came_sumsq_segment(g, gt, off, len, f.row[row], f.col + (row / f.layout.rows) * f.layout.cols + c0);
    };
    double s = 0.0;
    if (f.kind == kFactored && folded[i].has_value() && n > 0) {
      TORCH_CHECK(row_means[i].has_value(), "folded sums need the row-state means");
      const Layout& l = f.layout;
      const int64_t C = l.cols, m0 = l.start / C / l.rows, m1 = (l.start + n - 1) / C / l.rows;
      const float* fold = state_ptr(*folded[i], folded[i]->numel(), "folded column sums");
      const float* means = state_ptr(*row_means[i], row_means[i]->numel(), "row-state means");
      TORCH_CHECK(folded[i]->numel() >= (m1 + 1) * C && row_means[i]->numel() > m1, "folded sums too short for the layout");
      for (int64_t mat = m0; mat <= m1; ++mat) {
        double cols_sum = 0.0;
        for (int64_t c = 0; c < C; ++c) {
          const double cf = f.col[mat * C + c];
          cols_sum += cf * cf * static_cast<double>(fold[mat * C + c]);
        }
        s += static_cast<double>(means[mat]) * cols_sum;
      }
      // the partial first and last rows, which phase 1 could not fold
      for_segments(l, 0, std::min(n, C - l.start % C), [&](int64_t row, int64_t c0, int64_t off, int64_t len) {
        if (len != C) s += segment_sumsq(row, c0, off, len);
      });
      const int64_t last = std::max<int64_t>(std::min(n, C - l.start % C), (l.start + n - 1) / C * C - l.start);
      for_segments(l, last, n, [&](int64_t row, int64_t c0, int64_t off, int64_t len) {
        if (len != C) s += segment_sumsq(row, c0, off, len);
      });
    } else if (f.kind == kFactored) {
      s = sum_tiles(n, [&](int64_t lo, int64_t hi) {
        double acc = 0.0;
        for_segments(f.layout, lo, hi, [&](int64_t row, int64_t c0, int64_t off, int64_t len) { acc += segment_sumsq(row, c0, off, len); });
        return acc;
      });
    } else {
      s = sum_tiles(n, [&](int64_t lo, int64_t hi) { return k->came_sumsq_elem(g, gt, f.elem, lo, hi); });
    }
    out.data_ptr<float>()[i] = static_cast<float>(s);
  }
  return out;
}

// CAME's kept mask: one bit per element in 64-bit words, plus 8 bytes of padding for the
// unaligned 8-byte reads of dc::mask_bits_at. The momentum pass needs it zeroed.
int64_t came_mask_bytes(int64_t n) { return (n + 63) / 64 * 8 + 8; }

Tensor came_momentum(const std::vector<Tensor>& grads, const std::vector<Tensor>& exp_avgs, const std::vector<int64_t>& kinds,
                     const std::vector<int64_t>& starts, const std::vector<int64_t>& rows, const std::vector<int64_t>& cols,
                     const std::vector<OptTensor>& row_f, const std::vector<OptTensor>& col_f, const std::vector<OptTensor>& elem_f,
                     const Tensor& clips, double beta1, double one_minus_beta1, double eps2, const std::vector<OptTensor>& res_rows,
                     const std::vector<OptTensor>& res_cols, const std::vector<OptTensor>& masks) {
  check_lists(grads.size(), {exp_avgs.size(), kinds.size(), starts.size(), rows.size(), cols.size(), row_f.size(), col_f.size(),
                             elem_f.size(), res_rows.size(), res_cols.size(), masks.size()});
  const float* clip = state_ptr(clips, static_cast<int64_t>(grads.size()), "clip divisors");
  const auto* k = active();
  std::vector<int64_t> counts(grads.size(), 0);
  for (size_t i = 0; i < grads.size(); ++i) {
    const int64_t n = grads[i].numel();
    check_flat(grads[i], n, "grad");
    const int gt = dtype_code(grads[i], "grad");
    const void* g = grads[i].data_ptr();
    float* m = state_ptr(exp_avgs[i], n, "exp_avg");
    const Factors f = factors_at(i, n, kinds, starts, rows, cols, row_f, col_f, elem_f);
    const dc::CameMomentumParams a{clip[i], static_cast<float>(beta1), static_cast<float>(one_minus_beta1),
                                   static_cast<float>(eps2)};
    uint64_t* words = masks[i].has_value() ? reinterpret_cast<uint64_t*>(scratch_ptr(*masks[i], came_mask_bytes(n), "mask buffer")) : nullptr;
    if (f.kind == kFactored) {
      TORCH_CHECK(res_rows[i].has_value() && res_cols[i].has_value(), "factored fragment without residual sum buffers");
      float* rs = state_ptr(*res_rows[i], res_rows[i]->numel(), "residual row sums");
      float* cs = state_ptr(*res_cols[i], res_cols[i]->numel(), "residual column sums");
      TORCH_CHECK(res_rows[i]->numel() >= f.layout.start / f.layout.cols + 1 || n == 0, "residual row sums too short");
      auto seg = [&](int64_t row, int64_t c0, int64_t off, int64_t len, float* acc, BlockOut* out) {
        return k->came_momentum_segment(g, gt, m, off, len, f.row[row], f.col + (row / f.layout.rows) * f.layout.cols + c0, a, acc,
                                        &out->count, words != nullptr ? &out->bits : nullptr);
      };
      counts[i] = row_col_sums(f.layout, n, rs, cs, seg, words);
    } else {
      counts[i] = count_tiles(n, [&](int64_t lo, int64_t hi) {
        dc::MaskBits bits;
        bits.words = words;
        const int64_t c = k->came_momentum_elem(g, gt, m, f.elem, lo, hi, a, words != nullptr ? &bits : nullptr);
        bits.flush();
        return c;
      });
    }
  }
  return as_counts(counts);
}

void came_apply(const std::vector<Tensor>& params, const std::vector<Tensor>& grads, const std::vector<Tensor>& exp_avgs,
                const std::vector<int64_t>& kinds, const std::vector<int64_t>& starts, const std::vector<int64_t>& rows,
                const std::vector<int64_t>& cols, const std::vector<OptTensor>& row_f, const std::vector<OptTensor>& col_f,
                const std::vector<OptTensor>& elem_f, const std::vector<double>& decays, const std::vector<double>& neg_lrs,
                const OptTensor& scales, const std::vector<OptTensor>& masks) {
  check_lists(params.size(), {grads.size(), exp_avgs.size(), kinds.size(), starts.size(), rows.size(), cols.size(), row_f.size(), col_f.size(),
                              elem_f.size(), masks.size(), decays.size(), neg_lrs.size()});
  const auto* k = active();
  for (size_t i = 0; i < params.size(); ++i) {
    const int64_t n = params[i].numel();
    check_flat(params[i], n, "param");
    check_flat(grads[i], n, "grad");
    void* p = params[i].data_ptr();
    const int pt = dtype_code(params[i], "param"), gt = dtype_code(grads[i], "grad");
    const void* g = grads[i].data_ptr();
    const float* m = state_ptr(exp_avgs[i], n, "exp_avg");
    const Factors f = factors_at(i, n, kinds, starts, rows, cols, row_f, col_f, elem_f);
    const dc::CameApplyParams a{static_cast<float>(decays[i]), static_cast<float>(neg_lrs[i]), scales.has_value(), scale_at(scales, i)};
    const uint8_t* mask = masks[i].has_value() ? scratch_ptr(*masks[i], came_mask_bytes(n), "mask buffer") : nullptr;
    auto col_of = [&](int64_t row, int64_t c0) { return f.col + (row / f.layout.rows) * f.layout.cols + c0; };
    for_tiles(n, [&](int64_t, int64_t lo, int64_t hi) {
      if (f.kind == kFactored) {
        // a full tile as its two halves in step (two prefetch streams, as kernels.h's for_each)
        const int64_t h = hi - lo == kTile ? kTile / 2 : 0;
        for_segment_pairs(f.layout, lo, lo + h, h, [&](int64_t ra, int64_t ca, int64_t oa, int64_t rb, int64_t cb, int64_t ob, int64_t len) {
          const int64_t offs[2] = {oa, ob};
          const float rowf[2] = {f.row[ra], f.row[rb]};
          const float* colf[2] = {col_of(ra, ca), col_of(rb, cb)};
          k->came_apply_pair(p, pt, g, gt, m, offs, len, rowf, colf, a, mask);
        });
        for_segments(f.layout, lo + 2 * h, hi, [&](int64_t row, int64_t c0, int64_t off, int64_t len) {
          k->came_apply_segment(p, pt, g, gt, m, off, len, f.row[row], col_of(row, c0), a, mask);
        });
      } else {
        k->came_apply_elem(p, pt, g, gt, m, f.elem, lo, hi, a, mask);
      }
    });
  }
}

// CAME's factor math over one segment's flat buffers (came_factors.h). `run_rows_per_matrix` /
// `run_rows`: the (R, rows) runs of whole matrices in row order.
void came_factor_update(const Tensor& row_state, const Tensor& col_state, const Tensor& row_sums, const Tensor& col_sums,
                        const Tensor& row_counts, const Tensor& col_counts, const std::vector<int64_t>& run_rows_per_matrix,
                        const std::vector<int64_t>& run_rows, double beta, double one_minus_beta, const Tensor& row_factor,
                        const Tensor& col_factor, const Tensor& means) {
  check_lists(run_rows.size(), {run_rows_per_matrix.size()});
  const int64_t rows = row_state.numel(), cols = col_state.numel();
  int64_t covered = 0, matrices = 0;
  for (size_t r = 0; r < run_rows.size(); ++r) {
    const int64_t R = run_rows_per_matrix[r], n = run_rows[r];
    TORCH_CHECK(R > 0 && n >= 0 && n % R == 0, "came_factor_update: run ", r, " of ", n, " rows is not whole matrices of ", R, " rows");
    covered += n;
    matrices += n / R;
  }
  TORCH_CHECK(covered == rows, "came_factor_update: runs cover ", covered, " rows, the row state has ", rows);
  dc::FactorSpans spans{state_ptr(row_state, rows, "row state"),
                        state_ptr(col_state, cols, "column state"),
                        state_ptr(row_sums, rows, "row sums"),
                        state_ptr(col_sums, cols, "column sums"),
                        state_ptr(row_counts, rows, "row counts"),
                        state_ptr(col_counts, cols, "column counts"),
                        state_ptr(row_factor, rows, "row factor"),
                        state_ptr(col_factor, cols, "column factor"),
                        state_ptr(means, matrices, "means"),
                        rows,
                        cols,
                        run_rows_per_matrix.data(),
                        run_rows.data(),
                        static_cast<int64_t>(run_rows.size())};
  dc::came_factor_update(spans, static_cast<float>(beta), static_cast<float>(one_minus_beta));
}

// A new fp32 vector like `a`, after checking that `b` is an fp32 vector as long.
Tensor per_tensor_result(const Tensor& a, const Tensor& b, const char* what_a, const char* what_b) {
  TORCH_CHECK(a.dim() == 1, what_a, " must be a vector");
  state_ptr(a, a.numel(), what_a);
  state_ptr(b, a.numel(), what_b);
  return torch::empty({a.numel()}, torch::kFloat32);
}

Tensor mask_scales(const Tensor& counts, const Tensor& sizes) {
  Tensor out = per_tensor_result(counts, sizes, "counts", "sizes");
  dc::mask_scales(counts.data_ptr<float>(), sizes.data_ptr<float>(), out.data_ptr<float>(), counts.numel());
  return out;
}

}  // namespace

// The kernels as PyTorch custom ops, torch.ops.dist_cautious_cpu.*: through the dispatcher a
// TorchDispatchMode sees (and counts) them, FakeTensorMode runs their fake implementations
// (dist_cautious/kernels/cpu_library.py) instead, and torch.compile can trace the code around
// them. The schemas mark what each op writes (`(a!)`), so nothing that reorders or functionalises
// ops can drop an in-place update. A second definition of the library in one process fails here.
TORCH_LIBRARY(dist_cautious_cpu, m) {
  m.def("adamw_mask_counts(Tensor[] grads, Tensor[] exp_avgs, float weight) -> Tensor");
  m.def("lion_mask_counts(Tensor[] grads, Tensor[] exp_avgs, float weight) -> Tensor");
  m.def(
      "adamw_apply(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, Tensor(c!)[] exp_avg_sqs, float[] neg_step_sizes, "
      "float[] sqrt_bc2s, float[] decays, float m_weight, float beta2, float one_minus_beta2, float eps, Tensor? scales) -> ()");
  m.def(
      "lion_apply(Tensor(a!)[] params, Tensor[] grads, Tensor(b!)[] exp_avgs, float[] decays, float update_weight, float m_weight, "
      "float[] neg_lrs, Tensor? scales) -> ()");
  m.def("lion_encode(Tensor[] grads, Tensor(a!)[] exp_avgs, Tensor(b!)[] codes, float update_weight, float m_weight) -> Tensor");
  m.def("lion_decode_apply(Tensor(a!)[] params, Tensor[] codes, float[] decays, float[] neg_lrs, Tensor scales) -> ()");
  m.def(
      "came_factored_sq_sums(Tensor[] grads, int[] starts, int[] rows, int[] cols, float eps1, Tensor(a!)[] row_sums, "
      "Tensor(b!)[] col_sums, Tensor?[] row_states, float beta2, float one_minus_beta2, Tensor(c!)?[] folded) -> ()");
  m.def("came_vector_second_moment(Tensor[] grads, Tensor(a!)[] exp_avg_sqs, float beta2, float one_minus_beta2, float eps1) -> ()");
  m.def(
      "came_update_sumsq(Tensor[] grads, int[] kinds, int[] starts, int[] rows, int[] cols, Tensor?[] row_factor, "
      "Tensor?[] col_factor, Tensor?[] elementwise, Tensor?[] folded, Tensor?[] row_means) -> Tensor");
  m.def(
      "came_momentum(Tensor[] grads, Tensor(a!)[] exp_avgs, int[] kinds, int[] starts, int[] rows, int[] cols, "
      "Tensor?[] row_factor, Tensor?[] col_factor, Tensor?[] elementwise, Tensor clips, float beta1, float one_minus_beta1, "
      "float eps2, Tensor(b!)?[] res_row_sums, Tensor(c!)?[] res_col_sums, Tensor(d!)?[] masks) -> Tensor");
  m.def(
      "came_apply(Tensor(a!)[] params, Tensor[] grads, Tensor[] exp_avgs, int[] kinds, int[] starts, int[] rows, int[] cols, "
      "Tensor?[] row_factor, Tensor?[] col_factor, Tensor?[] elementwise, float[] decays, float[] neg_lrs, Tensor? scales, "
      "Tensor?[] masks) -> ()");
  m.def(
      "came_factor_update(Tensor(a!) row_state, Tensor(b!) col_state, Tensor row_sums, Tensor col_sums, Tensor row_counts, "
      "Tensor col_counts, int[] run_rows_per_matrix, int[] run_rows, float beta, float one_minus_beta, Tensor(c!) row_factor, "
      "Tensor(d!) col_factor, Tensor(e!) means) -> ()");
  m.def("mask_scales(Tensor counts, Tensor sizes) -> Tensor");
}

TORCH_LIBRARY_IMPL(dist_cautious_cpu, CPU, m) {
  m.impl("adamw_mask_counts", &adamw_mask_counts);
  m.impl("lion_mask_counts", &lion_mask_counts);
  m.impl("adamw_apply", &adamw_apply);
  m.impl("lion_apply", &lion_apply);
  m.impl("lion_encode", &lion_encode);
  m.impl("lion_decode_apply", &lion_decode_apply);
  m.impl("came_factored_sq_sums", &came_factored_sq_sums);
  m.impl("came_vector_second_moment", &came_vector_second_moment);
  m.impl("came_update_sumsq", &came_update_sumsq);
  m.impl("came_momentum", &came_momentum);
  m.impl("came_apply", &came_apply);
  m.impl("came_factor_update", &came_factor_update);
  m.impl("mask_scales", &mask_scales);
}

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "dist_cautious CPU kernels (AVX-512 / AVX2 / scalar, OpenMP over tiles), also torch.ops.dist_cautious_cpu.*";
  m.def("available_isas", &available_isas, "instruction sets this CPU and build support, best first");
  m.def("current_isa", &current_isa);
  m.def("set_isa", &set_isa, "force 'avx512', 'avx2' or 'scalar' (tests), or 'auto'");
  m.def("set_came_sq_rows", &set_came_sq_rows, "CAME phase 1's whole rows walked in step, 1 to 4 (tests; 4 by default)");
  m.def("tile_size", []() { return kTile; });
  m.def("lion_code_bytes", &lion_code_bytes, "bytes of the 2-bit code buffer for n elements");
  m.def("came_mask_bytes", &came_mask_bytes, "bytes of the kept-mask buffer for n elements");
  // The same kernels called directly, for eager steps with no dispatch mode active: converting
  // the op's long tensor lists to and from the dispatcher's boxed values costs ~0.25 us per
  // tensor and list entry (cpu_library.py), about 15% of a cautious CAME step on small tensors.
  m.def("adamw_mask_counts", &adamw_mask_counts);
  m.def("lion_mask_counts", &lion_mask_counts);
  m.def("adamw_apply", &adamw_apply);
  m.def("lion_apply", &lion_apply);
  m.def("lion_encode", &lion_encode);
  m.def("lion_decode_apply", &lion_decode_apply);
  m.def("came_factored_sq_sums", &came_factored_sq_sums);
  m.def("came_vector_second_moment", &came_vector_second_moment);
  m.def("came_update_sumsq", &came_update_sumsq);
  m.def("came_momentum", &came_momentum);
  m.def("came_apply", &came_apply);
  m.def("came_factor_update", &came_factor_update);
  m.def("mask_scales", &mask_scales);
}
