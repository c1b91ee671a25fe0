// The only torch-aware file of the CUDA kernels: checks tensors, packs their raw pointers and
// sizes into descriptors, keeps the descriptor tables in device memory (uploaded once per
// distinct table, in one pinned host-to-device copy on the current stream, then reused), and
// calls the launchers of csrc/cuda/*.cu with that stream. No call here synchronises with the
// host: counts and sums stay on the device. A call that finds its tables already on the device
// copies nothing from the host, so a warmed-up step can be captured in a CUDA graph.
//
// dist_cautious/kernels/cuda_ops.py wraps these functions into the signatures of
// dist_cautious/kernels/reference.py; it computes every host-side scalar (bias corrections,
// 1 - beta) in Python double precision exactly as the reference does, and this file rounds them
// to fp32 as torch's CUDA kernels round a Python scalar.

// Narrow includes instead of <torch/extension.h> (which pulls in the whole C++ frontend):
// the tensor type, the two factory ops used here, CUDA stream/guard, and torch's pybind11
// casters. This keeps the build and the CI syntax check of this file short.
#include <ATen/core/Tensor.h>
#include <ATen/ops/empty.h>
#include <ATen/ops/zeros.h>
#include <torch/csrc/utils/pybind.h>

#include <algorithm>
#include <atomic>
#include <cstdint>
#include <cstring>
#include <initializer_list>
#include <map>
#include <mutex>
#include <optional>
#include <string>
#include <tuple>
#include <vector>

#include "dc_kernels.h"

namespace dc = dist_cautious;
using at::Tensor;

// The device seam: the only lines that differ between the shipped build and the CPU-emulated
// test build (tests/gpu/cuda_on_cpu defines DC_CUDA_ON_CPU: CPU tensors stand in for CUDA
// tensors, the kernels run on host threads, synchronously). Everything else in this file,
// checks included, runs in both.
#ifdef DC_CUDA_ON_CPU
namespace {
bool on_device(const Tensor& t) { return t.is_cpu(); }
struct DeviceGuard {
  explicit DeviceGuard(const at::Device&) {}
};
// The emulated kernels run on no stream and nothing is captured; the tests set both by hand
// (simulate_stream, simulate_capture) so that the descriptor cache's keys and its capture
// checks run as in the CUDA build.
cudaStream_t simulated_stream = nullptr;
bool simulated_capture = false;
cudaStream_t current_stream(const at::Device&) { return simulated_stream; }
bool stream_capturing(cudaStream_t) { return simulated_capture; }
// The emulated kernels run before the launcher returns: an ordinary host buffer will do.
Tensor upload_bytes(const void* data, int64_t bytes, const at::Device&) {
  Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte));
  std::memcpy(host.data_ptr(), data, static_cast<size_t>(bytes));
  return host;
}
// A table uploaded while (simulated) capturing: as upload_bytes; the CUDA build's differs.
Tensor upload_bytes_for_capture(const void* data, int64_t bytes, const at::Device& device, cudaStream_t) {
  return upload_bytes(data, bytes, device);
}
// Test hooks of the emulated build only.
void def_emulation_hooks(pybind11::module_& m) {
  m.def("simulate_capture", [](bool capturing) { simulated_capture = capturing; },
        "test hook: calls from now on see their stream as capturing a CUDA graph (or not)");
  m.def("simulate_stream", [](int64_t stream) { simulated_stream = reinterpret_cast<cudaStream_t>(stream); },
        "test hook: calls from now on run on this stream handle (0: the default stream); only the "
        "descriptor cache's keys see it");
}
}  // namespace
#else
#include <c10/cuda/CUDAGraphsC10Utils.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
namespace {
bool on_device(const Tensor& t) { return t.is_cuda(); }
using DeviceGuard = c10::cuda::CUDAGuard;
cudaStream_t current_stream(const at::Device& device) { return c10::cuda::getCurrentCUDAStream(device.index()).stream(); }
// Whether `stream` is capturing a CUDA graph (an invalidated capture counts: it is still open).
bool stream_capturing(cudaStream_t stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  const cudaError_t error = cudaStreamIsCapturing(stream, &status);
  TORCH_CHECK(error == cudaSuccess, "dist_cautious CUDA kernels: cudaStreamIsCapturing failed: ", cudaGetErrorString(error));
  return status != cudaStreamCaptureStatusNone;
}
// One pinned host buffer copied to the device on the current stream; the caching host allocator
// keeps the pinned block alive until the copy has run.
Tensor upload_bytes(const void* data, int64_t bytes, const at::Device& device) {
  Tensor host = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).pinned_memory(true));
  std::memcpy(host.data_ptr(), data, static_cast<size_t>(bytes));
  return host.to(device, /*non_blocking=*/true);
}
// A table uploaded while `stream` is capturing a CUDA graph: the copy is captured and replayed,
// so it reads its source on every replay; that source is a pinned host buffer made for it and
// never freed or written again (torch's pinned blocks are reused once freed). cudaHostAlloc is
// not a stream operation; it runs in relaxed capture mode, as torch's allocators allocate
// during capture. The device table comes from the capture's memory pool.
Tensor upload_bytes_for_capture(const void* data, int64_t bytes, const at::Device& device, cudaStream_t stream) {
  void* host = nullptr;
  {
    c10::cuda::CUDAStreamCaptureModeGuard relaxed{cudaStreamCaptureModeRelaxed};
    const cudaError_t error = cudaHostAlloc(&host, static_cast<size_t>(bytes), cudaHostAllocDefault);
    TORCH_CHECK(error == cudaSuccess, "dist_cautious CUDA kernels: cudaHostAlloc of a captured table failed: ", cudaGetErrorString(error));
  }
  std::memcpy(host, data, static_cast<size_t>(bytes));
  Tensor table = at::empty({bytes}, at::TensorOptions().dtype(at::kByte).device(device));
  const cudaError_t error = cudaMemcpyAsync(table.data_ptr(), host, static_cast<size_t>(bytes), cudaMemcpyHostToDevice, stream);
  TORCH_CHECK(error == cudaSuccess, "dist_cautious CUDA kernels: captured table copy failed: ", cudaGetErrorString(error));
  return table;
}
void def_emulation_hooks(pybind11::module_&) {}
}  // namespace
#endif

namespace {

int32_t dtype_code(const Tensor& t, const char* what) {
  switch (t.scalar_type()) {
    case at::kFloat: return dc::kF32;
    case at::kBFloat16: return dc::kBF16;
    case at::kHalf: return dc::kF16;
    default: TORCH_CHECK(false, "dist_cautious CUDA kernels: ", what, " must be float32, bfloat16 or float16, got ", t.scalar_type());
  }
  return dc::kF32;
}

void check_flat(const Tensor& t, const char* what, const at::Device& device, int64_t numel) {
  TORCH_CHECK(on_device(t) && t.device() == device, "dist_cautious CUDA kernels: ", what, " must be on ", device, ", got ", t.device());
  TORCH_CHECK(t.is_contiguous(), "dist_cautious CUDA kernels: ", what, " must be contiguous");
  TORCH_CHECK(numel < 0 || t.numel() == numel, "dist_cautious CUDA kernels: ", what, " has ", t.numel(), " elements, expected ", numel);
}

void check_state(const Tensor& t, const char* what, const at::Device& device, int64_t numel) {
  check_flat(t, what, device, numel);
  TORCH_CHECK(t.scalar_type() == at::kFloat, "dist_cautious CUDA kernels: ", what, " must be float32, got ", t.scalar_type());
}

// ---- Tables kept on the device ------------------------------------------------------------------
// Why: a step captured in a CUDA graph must not copy from a host buffer that changes. A copy
// captured from a pinned host buffer reads that buffer on every replay, and torch's host
// allocator frees and reuses it after capture, so replays would launch with whatever it holds by
// then. A step plan keeps its tensors, so its descriptor tables repeat byte for byte from step to
// step: each is uploaded once (the first, warm-up step) and reused from then on, and a captured
// step finds them on the device. Tables first needed while capturing (grads a captured backward
// allocates) are copied from host buffers kept for good (upload_bytes_for_capture).

std::atomic<int64_t> table_uploads{0};

// A descriptor or run table in device memory: one host-to-device copy on `stream`, from a
// buffer kept for good when the stream is capturing (upload_bytes_for_capture), counted for the
// tests (descriptor_uploads()).
Tensor upload_table(const void* data, size_t bytes, const at::Device& device, cudaStream_t stream, bool capturing) {
  table_uploads.fetch_add(1);
  if (capturing) return upload_bytes_for_capture(data, static_cast<int64_t>(bytes), device, stream);
  return upload_bytes(data, static_cast<int64_t>(bytes), device);
}

// The descriptor tables of the kernel calls, keyed by content: a hit is a device copy of exactly
// the bytes the call would upload, so reusing it can never launch with other descriptors. The
// key holds the stream the entry was uploaded and allocated on: launches on that stream run
// after its upload, and once it is evicted torch's caching allocator reuses its block on that
// stream only, after those launches. Bounded: an entry past kMaxEntries evicts the least
// recently used one, except entries used while their stream was capturing (a captured graph
// reads them on every replay), which are kept for good. Never destroyed: device memory must not
// be freed after the CUDA context at exit.
class DescriptorTables {
 public:
  static constexpr size_t kMaxEntries = 256;  // evictable entries; a plan needs a few per step

  Tensor find_or_upload(std::string bytes, const at::Device& device, cudaStream_t stream) {
    const bool capturing = stream_capturing(stream);
    std::lock_guard<std::mutex> lock(mutex_);
    Key key{static_cast<int>(device.type()), static_cast<int>(device.index()), std::move(bytes), reinterpret_cast<uintptr_t>(stream)};
    auto found = entries_.find(key);
    if (found == entries_.end() && capturing) found = on_another_stream(key);
    if (found != entries_.end()) return use(found->second, capturing);
    // A miss while capturing: tensors the warm-up did not have (grads a captured backward
    // allocates from the graph's pool). Uploaded from a kept host buffer and never evicted.
    Tensor table = upload_table(std::get<2>(key).data(), std::get<2>(key).size(), device, stream, capturing);
    if (!capturing) {
      evict_beyond(kMaxEntries - 1);
      ++evictable_;
    }
    return use(entries_.emplace(std::move(key), Entry{std::move(table), 0, capturing}).first->second, false);
  }

 private:
  // (device type, device index, bytes, stream): the bytes before the stream, so that the
  // entries of one device and content are neighbours (on_another_stream).
  using Key = std::tuple<int, int, std::string, uintptr_t>;
  struct Entry {
    Tensor table;
    uint64_t last_use = 0;
    bool captured = false;  // used while capturing: never evicted
  };

  Tensor use(Entry& entry, bool capturing) {
    entry.last_use = ++clock_;
    if (capturing && !entry.captured) {
      entry.captured = true;
      --evictable_;
    }
    return entry.table;
  }

  // A graph is captured on a stream of its own (torch.cuda.graph's), not the one its warm-up
  // ran on: while capturing, the same device and bytes uploaded on another stream serve too.
  // Safe: the capture is ordered after the warm-up (torch.cuda.graph synchronises the device
  // before capture begins; CUDA graphs require it of every input anyway), so that upload is
  // complete, and the entry, captured from now on, is never freed or reused.
  std::map<Key, Entry>::iterator on_another_stream(const Key& key) {
    auto first = entries_.lower_bound(Key{std::get<0>(key), std::get<1>(key), std::get<2>(key), 0});
    const bool same = first != entries_.end() && std::get<0>(first->first) == std::get<0>(key) &&
                      std::get<1>(first->first) == std::get<1>(key) && std::get<2>(first->first) == std::get<2>(key);
    return same ? first : entries_.end();
  }

  // Evicts the least recently used evictable entries until at most `keep` are left.
  void evict_beyond(size_t keep) {
    while (evictable_ > keep) {
      auto oldest = entries_.end();
      for (auto it = entries_.begin(); it != entries_.end(); ++it) {
        if (!it->second.captured && (oldest == entries_.end() || it->second.last_use < oldest->second.last_use)) oldest = it;
      }
      entries_.erase(oldest);
      --evictable_;
    }
  }

  std::mutex mutex_;
  std::map<Key, Entry> entries_;
  size_t evictable_ = 0;
  uint64_t clock_ = 0;
};

// The one cache of the process (its bound counts all kinds of descriptors together).
DescriptorTables& descriptor_tables() {
  static auto* tables = new DescriptorTables();
  return *tables;
}

// The descriptors in device memory: the kept copy of these bytes, or one upload on `stream`.
template <typename Desc>
Tensor device_descriptors(const std::vector<Desc>& descs, const at::Device& device, cudaStream_t stream) {
  std::string bytes(reinterpret_cast<const char*>(descs.data()), descs.size() * sizeof(Desc));
  return descriptor_tables().find_or_upload(std::move(bytes), device, stream);
}

// A descriptor's out_index selects its slot in counts / sums / divisors / scales: it must lie in
// [0, limit), where limit is the length of the shortest buffer the launch indexes with it
// (kernels index those buffers without checks). int32 on the device.
int32_t checked_out_index(int64_t index, int64_t limit, size_t tensor) {
  TORCH_CHECK(limit <= INT32_MAX, "dist_cautious CUDA kernels: ", limit, " output slots exceed int32");
  TORCH_CHECK(index >= 0 && index < limit, "dist_cautious CUDA kernels: out_index ", index, " of tensor ", tensor, " outside [0, ", limit, ")");
  return static_cast<int32_t>(index);
}

void check_launch(cudaError_t error, const char* what) {
  TORCH_CHECK(error == cudaSuccess, "dist_cautious CUDA kernel ", what, " failed: ", cudaGetErrorString(error));
}

Tensor sumsq_partials(int64_t blocks, const std::vector<int64_t>& out_index, int64_t slots, const at::Device& device);

// Elementwise descriptors from parallel lists; an empty list means "not used by this op".
struct ElemLists {
  const std::vector<Tensor>* params = nullptr;
  const std::vector<Tensor>* grads = nullptr;
  const std::vector<Tensor>* exp_avgs = nullptr;
  const std::vector<Tensor>* exp_avg_sqs = nullptr;  // AdamW v, CAME 1-D v or preconditioner
  const std::vector<bool>* has_exp_avg_sq = nullptr;  // CAME: false = identity preconditioner
  const std::vector<int64_t>* out_index = nullptr;    // default: position in the list
  int64_t out_limit = -1;                             // slots out_index may name; -1: list length
  const std::vector<double>* decays = nullptr;        // apply ops: 1 - lr * wd per tensor
  const std::vector<double>* neg_lrs = nullptr;       // Lion / CAME apply: -lr per tensor
};

// The per-tensor scalars of the apply ops, one per tensor of the list (not per out_index slot),
// rounded to fp32 as torch rounds a Python scalar: a call may span param groups of different lr
// and weight decay. Unused lists stay null and leave the fields at decay 1, neg_lr 0.
void check_per_tensor(const std::vector<double>* values, size_t count, const char* what) {
  TORCH_CHECK(values == nullptr || values->size() == count, "dist_cautious CUDA kernels: ", values ? values->size() : 0, " ", what,
              " for ", count, " tensors");
}

template <typename Desc>
void set_per_tensor(Desc& d, size_t t, const std::vector<double>* decays, const std::vector<double>* neg_lrs) {
  d.decay = decays ? static_cast<float>((*decays)[t]) : 1.0f;
  d.neg_lr = neg_lrs ? static_cast<float>((*neg_lrs)[t]) : 0.0f;
}

std::vector<dc::ElemDesc> elem_descs(const ElemLists& lists, at::Device& device) {
  const auto& grads = *lists.grads;
  std::vector<dc::ElemDesc> descs;
  if (grads.empty()) return descs;
  device = grads[0].device();
  const size_t count = grads.size();
  auto used = [count](const std::vector<Tensor>* list, const char* what) {
    if (list == nullptr || list->empty()) return false;
    TORCH_CHECK(list->size() == count, "dist_cautious CUDA kernels: ", what, " has ", list->size(), " tensors, grads has ", count);
    return true;
  };
  const bool with_params = used(lists.params, "params");
  const bool with_m = used(lists.exp_avgs, "exp_avgs");
  const bool with_v = used(lists.exp_avg_sqs, "exp_avg_sqs");
  TORCH_CHECK(lists.out_index == nullptr || lists.out_index->size() == count, "dist_cautious CUDA kernels: out_index length");
  TORCH_CHECK(lists.has_exp_avg_sq == nullptr || lists.has_exp_avg_sq->size() == count, "dist_cautious CUDA kernels: has_exp_avg_sq length");
  check_per_tensor(lists.decays, count, "decays");
  check_per_tensor(lists.neg_lrs, count, "neg_lrs");
  for (size_t t = 0; t < count; ++t) {
    const Tensor& g = grads[t];
    const int64_t n = g.numel();
    check_flat(g, "grad", device, -1);
    dc::ElemDesc d{};
    d.grad = g.data_ptr();
    d.grad_dtype = dtype_code(g, "grad");
    d.param_dtype = dc::kF32;
    d.n = n;
    d.out_index = checked_out_index(lists.out_index ? (*lists.out_index)[t] : static_cast<int64_t>(t),
                                    lists.out_limit < 0 ? static_cast<int64_t>(count) : lists.out_limit, t);
    set_per_tensor(d, t, lists.decays, lists.neg_lrs);
    if (with_params) {
      const Tensor& p = (*lists.params)[t];
      check_flat(p, "param", device, n);
      d.param = p.data_ptr();
      d.param_dtype = dtype_code(p, "param");
    }
    if (with_m) {
      check_state((*lists.exp_avgs)[t], "exp_avg", device, n);
      d.exp_avg = (*lists.exp_avgs)[t].data_ptr<float>();
    }
    if (with_v && (lists.has_exp_avg_sq == nullptr || (*lists.has_exp_avg_sq)[t])) {
      check_state((*lists.exp_avg_sqs)[t], "exp_avg_sq", device, n);
      d.exp_avg_sq = (*lists.exp_avg_sqs)[t].data_ptr<float>();
    }
    if (n > 0) descs.push_back(d);  // empty tensors own no block
  }
  return descs;
}

const float* optional_scales(const std::optional<Tensor>& scales, const at::Device& device, int64_t count) {
  if (!scales.has_value() || !scales->defined()) return nullptr;
  check_state(*scales, "scales", device, count);
  return scales->data_ptr<float>();
}

// capturable=True: the apply ops' per-tensor step scalars from a device table (dc_kernels.h,
// StepScalarColumn), fp32 [slots, 4], row out_index per tensor, instead of the host lists
// `host_lists` (named `host_names`), which must then be empty: lr and step live on the device,
// and the descriptors hold no value that changes from step to step (the same tensors give the
// same descriptor bytes at every step). Null when no table is given (the host lists serve).
const float* step_scalar_table(const std::optional<Tensor>& table, const at::Device& device, int64_t slots, const char* op,
                               std::initializer_list<size_t> host_lists, const char* host_names) {
  if (!table.has_value() || !table->defined()) {
    // Host scalars in the descriptors would be fixed into a captured graph: every replay would
    // step with this step's lr and bias corrections.
    TORCH_CHECK(!stream_capturing(current_stream(device)), "dist_cautious CUDA kernels: ", op,
                " with host scalars cannot be captured in a CUDA graph (lr and the step counts would be fixed into it); "
                "construct the optimizer with capturable=True");
    return nullptr;
  }
  for (size_t length : host_lists) {
    TORCH_CHECK(length == 0, "dist_cautious CUDA kernels: ", op, ": with step_scalars the host lists (", host_names,
                ") must be empty, got one of ", length, " values");
  }
  check_state(*table, "step_scalars", device, -1);
  TORCH_CHECK(table->dim() == 2 && table->size(0) == slots && table->size(1) == dc::kStepScalarColumns, "dist_cautious CUDA kernels: ", op,
              ": step_scalars must have shape [", slots, ", ", dc::kStepScalarColumns, "], got ", table->sizes());
  return table->data_ptr<float>();
}

Tensor lerp_mask_counts(const std::vector<Tensor>& grads, const std::vector<Tensor>& exp_avgs, double weight, bool lion) {
  TORCH_CHECK(!grads.empty(), "dist_cautious CUDA kernels: empty list");
  at::Device device = grads[0].device();
  DeviceGuard guard(device);
  ElemLists lists;
  lists.grads = &grads;
  lists.exp_avgs = &exp_avgs;
  TORCH_CHECK(exp_avgs.size() == grads.size(), "dist_cautious CUDA kernels: exp_avgs length");
  auto descs = elem_descs(lists, device);
  Tensor counts = at::zeros({static_cast<int64_t>(grads.size())}, at::TensorOptions().dtype(at::kLong).device(device));
  if (descs.empty()) return counts;
  const int64_t blocks = dc::dc_prepare_elem(descs.data(), static_cast<int>(descs.size()));
  auto stream = current_stream(device);
  Tensor meta = device_descriptors(descs, device, stream);
  check_launch(dc::launch_lerp_mask_counts(reinterpret_cast<const dc::ElemDesc*>(meta.data_ptr()), static_cast<int>(descs.size()), blocks,
                                           static_cast<float>(weight), lion, reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()), stream),
               "lerp_mask_counts");
  return counts;
}

void adamw_apply(const std::vector<Tensor>& params, const std::vector<Tensor>& grads, const std::vector<Tensor>& exp_avgs,
                 const std::vector<Tensor>& exp_avg_sqs, const std::vector<double>& alphas, const std::vector<double>& bc2_sqrts,
                 const std::vector<double>& decays, double lerp_weight, double beta2, double one_minus_beta2, double eps,
                 const std::optional<Tensor>& scales, const std::optional<Tensor>& step_scalars) {
  if (grads.empty()) return;
  at::Device device = grads[0].device();
  DeviceGuard guard(device);
  const float* table = step_scalar_table(step_scalars, device, static_cast<int64_t>(grads.size()), "adamw_apply",
                                         {alphas.size(), bc2_sqrts.size(), decays.size()}, "alphas, bc2_sqrts, decays");
  TORCH_CHECK(params.size() == grads.size() && exp_avgs.size() == grads.size() && exp_avg_sqs.size() == grads.size() &&
                  (table || (alphas.size() == grads.size() && bc2_sqrts.size() == grads.size())),
              "dist_cautious CUDA kernels: adamw_apply lists differ in length");
  ElemLists lists;
  lists.params = &params;
  lists.grads = &grads;
  lists.exp_avgs = &exp_avgs;
  lists.exp_avg_sqs = &exp_avg_sqs;
  lists.decays = table ? nullptr : &decays;
  auto descs = elem_descs(lists, device);
  if (!table) {
    for (auto& d : descs) {
      // torch divides a tensor by a Python scalar on CUDA as x * (1 / fp32(s)).
      d.alpha = static_cast<float>(alphas[d.out_index]);
      d.inv_bc2_sqrt = 1.0f / static_cast<float>(bc2_sqrts[d.out_index]);
    }
  }
  const float* scale_ptr = optional_scales(scales, device, static_cast<int64_t>(grads.size()));
  if (descs.empty()) return;
  const int64_t blocks = dc::dc_prepare_elem(descs.data(), static_cast<int>(descs.size()));
  auto stream = current_stream(device);
  Tensor meta = device_descriptors(descs, device, stream);
  check_launch(dc::launch_adamw_apply(reinterpret_cast<const dc::ElemDesc*>(meta.data_ptr()), static_cast<int>(descs.size()), blocks,
                                      static_cast<float>(lerp_weight), static_cast<float>(beta2), static_cast<float>(one_minus_beta2),
                                      static_cast<float>(eps), scale_ptr, table, stream),
               "adamw_apply");
}

void lion_apply(const std::vector<Tensor>& params, const std::vector<Tensor>& grads, const std::vector<Tensor>& exp_avgs,
                const std::vector<double>& decays, double weight1, double weight2, const std::vector<double>& neg_lrs,
                const std::optional<Tensor>& scales, const std::optional<Tensor>& step_scalars) {
  if (grads.empty()) return;
  TORCH_CHECK(params.size() == grads.size() && exp_avgs.size() == grads.size(), "dist_cautious CUDA kernels: lion_apply lists differ in length");
  at::Device device = grads[0].device();
  DeviceGuard guard(device);
  const float* table = step_scalar_table(step_scalars, device, static_cast<int64_t>(grads.size()), "lion_apply",
                                         {decays.size(), neg_lrs.size()}, "decays, neg_lrs");
  ElemLists lists;
  lists.params = &params;
  lists.grads = &grads;
  lists.exp_avgs = &exp_avgs;
  lists.decays = table ? nullptr : &decays;
  lists.neg_lrs = table ? nullptr : &neg_lrs;
  auto descs = elem_descs(lists, device);
  const float* scale_ptr = optional_scales(scales, device, static_cast<int64_t>(grads.size()));
  if (descs.empty()) return;
  const int64_t blocks = dc::dc_prepare_elem(descs.data(), static_cast<int>(descs.size()));
  auto stream = current_stream(device);
  Tensor meta = device_descriptors(descs, device, stream);
  check_launch(dc::launch_lion_apply(reinterpret_cast<const dc::ElemDesc*>(meta.data_ptr()), static_cast<int>(descs.size()), blocks,
                                     static_cast<float>(weight1), static_cast<float>(weight2), scale_ptr, table, stream),
               "lion_apply");
}

void came_vector_second_moment(const std::vector<Tensor>& grads, const std::vector<Tensor>& exp_avg_sqs, double beta2,
                               double one_minus_beta2, double eps1) {
  if (grads.empty()) return;
  TORCH_CHECK(exp_avg_sqs.size() == grads.size(), "dist_cautious CUDA kernels: exp_avg_sqs length");
  at::Device device = grads[0].device();
  DeviceGuard guard(device);
  ElemLists lists;
  lists.grads = &grads;
  lists.exp_avg_sqs = &exp_avg_sqs;
  auto descs = elem_descs(lists, device);
  if (descs.empty()) return;
  const int64_t blocks = dc::dc_prepare_elem(descs.data(), static_cast<int>(descs.size()));
  auto stream = current_stream(device);
  Tensor meta = device_descriptors(descs, device, stream);
  check_launch(dc::launch_came_vector_second_moment(reinterpret_cast<const dc::ElemDesc*>(meta.data_ptr()), static_cast<int>(descs.size()),
                                                    blocks, static_cast<float>(beta2), static_cast<float>(one_minus_beta2),
                                                    static_cast<float>(eps1), stream),
               "came_vector_second_moment");
}

// The CAME 1-D ops share their lists: preconditioner v (rsqrt(v) multiplies) where has_v, else identity.
void came_vector_sumsq(const std::vector<Tensor>& grads, const std::vector<Tensor>& preconds, const std::vector<bool>& has_precond,
                       const std::vector<int64_t>& out_index, Tensor sums) {
  if (grads.empty()) return;
  at::Device device = grads[0].device();
  DeviceGuard guard(device);
  TORCH_CHECK(on_device(sums) && sums.scalar_type() == at::kDouble && sums.is_contiguous(), "dist_cautious CUDA kernels: sums must be a contiguous float64 CUDA tensor");
  ElemLists lists;
  lists.grads = &grads;
  lists.exp_avg_sqs = &preconds;
  lists.has_exp_avg_sq = &has_precond;
  lists.out_index = &out_index;
  lists.out_limit = sums.numel();
  auto descs = elem_descs(lists, device);
  if (descs.empty()) return;
  const int64_t blocks = dc::dc_prepare_elem(descs.data(), static_cast<int>(descs.size()));
  Tensor partials = sumsq_partials(blocks, out_index, sums.numel(), device);
  auto stream = current_stream(device);
  Tensor meta = device_descriptors(descs, device, stream);
  check_launch(dc::launch_came_vector_sumsq(reinterpret_cast<const dc::ElemDesc*>(meta.data_ptr()), static_cast<int>(descs.size()), blocks,
                                            sums.data_ptr<double>(), partials.data_ptr<double>(), stream),
               "came_vector_sumsq");
}

void came_vector_momentum(const std::vector<Tensor>& grads, const std::vector<Tensor>& exp_avgs, const std::vector<Tensor>& preconds,
                          const std::vector<bool>& has_precond, const std::vector<int64_t>& out_index, Tensor divisors, double beta1,
                          double one_minus_beta1, Tensor counts) {
  if (grads.empty()) return;
  at::Device device = grads[0].device();
  DeviceGuard guard(device);
  check_state(divisors, "clip divisors", device, -1);
  TORCH_CHECK(on_device(counts) && counts.scalar_type() == at::kLong && counts.is_contiguous(), "dist_cautious CUDA kernels: counts must be a contiguous int64 CUDA tensor");
  ElemLists lists;
  lists.grads = &grads;
  lists.exp_avgs = &exp_avgs;
  lists.exp_avg_sqs = &preconds;
  lists.has_exp_avg_sq = &has_precond;
  lists.out_index = &out_index;
  lists.out_limit = std::min(counts.numel(), divisors.numel());
  auto descs = elem_descs(lists, device);
  if (descs.empty()) return;
  const int64_t blocks = dc::dc_prepare_elem(descs.data(), static_cast<int>(descs.size()));
  auto stream = current_stream(device);
  Tensor meta = device_descriptors(descs, device, stream);
  check_launch(dc::launch_came_vector_momentum(reinterpret_cast<const dc::ElemDesc*>(meta.data_ptr()), static_cast<int>(descs.size()), blocks,
                                               divisors.data_ptr<float>(), static_cast<float>(beta1), static_cast<float>(one_minus_beta1),
                                               reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()), stream),
               "came_vector_momentum");
}

void came_vector_apply(const std::vector<Tensor>& params, const std::vector<Tensor>& grads, const std::vector<Tensor>& exp_avgs,
                       const std::vector<Tensor>& preconds, const std::vector<bool>& has_precond, const std::vector<int64_t>& out_index,
                       const std::vector<double>& decays, const std::vector<double>& neg_lrs, const std::optional<Tensor>& scales,
                       int64_t num_scales, const std::optional<Tensor>& step_scalars) {
  if (grads.empty()) return;
  at::Device device = grads[0].device();
  DeviceGuard guard(device);
  const float* table = step_scalar_table(step_scalars, device, num_scales, "came_vector_apply", {decays.size(), neg_lrs.size()}, "decays, neg_lrs");
  ElemLists lists;
  lists.params = &params;
  lists.grads = &grads;
  lists.exp_avgs = &exp_avgs;
  lists.exp_avg_sqs = &preconds;
  lists.has_exp_avg_sq = &has_precond;
  lists.out_index = &out_index;
  lists.out_limit = num_scales;
  lists.decays = table ? nullptr : &decays;
  lists.neg_lrs = table ? nullptr : &neg_lrs;
  auto descs = elem_descs(lists, device);
  const float* scale_ptr = optional_scales(scales, device, num_scales);
  if (descs.empty()) return;
  const int64_t blocks = dc::dc_prepare_elem(descs.data(), static_cast<int>(descs.size()));
  auto stream = current_stream(device);
  Tensor meta = device_descriptors(descs, device, stream);
  check_launch(dc::launch_came_vector_apply(reinterpret_cast<const dc::ElemDesc*>(meta.data_ptr()), static_cast<int>(descs.size()), blocks,
                                            scale_ptr, table, stream),
               "came_vector_apply");
}

// Factored descriptors: one per (grad, start, R, C); optional lists are empty when unused.
struct FactoredLists {
  const std::vector<Tensor>* params = nullptr;
  const std::vector<Tensor>* grads = nullptr;
  const std::vector<Tensor>* exp_avgs = nullptr;
  const std::vector<Tensor>* row_out = nullptr;
  const std::vector<Tensor>* col_out = nullptr;
  const std::vector<Tensor>* row_factor = nullptr;
  const std::vector<Tensor>* col_factor = nullptr;
  const std::vector<int64_t>* starts = nullptr;
  const std::vector<int64_t>* rows = nullptr;    // R per tensor
  const std::vector<int64_t>* cols = nullptr;    // C per tensor
  const std::vector<int64_t>* batches = nullptr; // B per tensor
  const std::vector<int64_t>* out_index = nullptr;
  int64_t out_limit = -1;                        // slots out_index may name; -1: list length
  const std::vector<double>* decays = nullptr;   // apply: 1 - lr * wd per tensor
  const std::vector<double>* neg_lrs = nullptr;  // apply: -lr per tensor
};

std::vector<dc::FactoredDesc> factored_descs(const FactoredLists& lists, at::Device& device) {
  const auto& grads = *lists.grads;
  std::vector<dc::FactoredDesc> descs;
  if (grads.empty()) return descs;
  device = grads[0].device();
  const size_t count = grads.size();
  auto used = [count](const std::vector<Tensor>* list, const char* what) {
    if (list == nullptr || list->empty()) return false;
    TORCH_CHECK(list->size() == count, "dist_cautious CUDA kernels: ", what, " has ", list->size(), " tensors, grads has ", count);
    return true;
  };
  TORCH_CHECK(lists.starts->size() == count && lists.rows->size() == count && lists.cols->size() == count &&
                  lists.batches->size() == count && lists.out_index->size() == count,
              "dist_cautious CUDA kernels: layout lists differ in length");
  check_per_tensor(lists.decays, count, "decays");
  check_per_tensor(lists.neg_lrs, count, "neg_lrs");
  const bool with_params = used(lists.params, "params");
  const bool with_m = used(lists.exp_avgs, "exp_avgs");
  const bool with_out = used(lists.row_out, "row sums") && used(lists.col_out, "col sums");
  const bool with_factor = used(lists.row_factor, "row factors") && used(lists.col_factor, "col factors");
  for (size_t t = 0; t < count; ++t) {
    const Tensor& g = grads[t];
    const int64_t n = g.numel();
    const int64_t start = (*lists.starts)[t], R = (*lists.rows)[t], C = (*lists.cols)[t], B = (*lists.batches)[t];
    int64_t BR = 0, numel = 0;
    TORCH_CHECK(R > 0 && C > 0 && B > 0 && !__builtin_mul_overflow(B, R, &BR) && !__builtin_mul_overflow(BR, C, &numel),
                "dist_cautious CUDA kernels: bad factored shape (", B, ", ", R, ", ", C, ")");
    TORCH_CHECK(start >= 0 && start <= numel - n, "dist_cautious CUDA kernels: range [", start, ", ", start + n, ") outside a (", B, ", ", R,
                ", ", C, ") tensor");
    check_flat(g, "grad", device, -1);
    dc::FactoredDesc d{};
    d.grad = g.data_ptr();
    d.grad_dtype = dtype_code(g, "grad");
    d.param_dtype = dc::kF32;
    d.start = start;
    d.n = n;
    d.rows = R;
    d.cols = C;
    d.out_index = checked_out_index((*lists.out_index)[t], lists.out_limit < 0 ? static_cast<int64_t>(count) : lists.out_limit, t);
    set_per_tensor(d, t, lists.decays, lists.neg_lrs);
    if (with_params) {
      const Tensor& p = (*lists.params)[t];
      check_flat(p, "param", device, n);
      d.param = p.data_ptr();
      d.param_dtype = dtype_code(p, "param");
    }
    if (with_m) {
      check_state((*lists.exp_avgs)[t], "exp_avg", device, n);
      d.exp_avg = (*lists.exp_avgs)[t].data_ptr<float>();
    }
    if (with_out) {
      check_state((*lists.row_out)[t], "row sums", device, B * R);
      check_state((*lists.col_out)[t], "col sums", device, B * C);
      d.row_out = (*lists.row_out)[t].data_ptr<float>();
      d.col_out = (*lists.col_out)[t].data_ptr<float>();
    }
    if (with_factor) {
      check_state((*lists.row_factor)[t], "row factor", device, B * R);
      check_state((*lists.col_factor)[t], "col factor", device, B * C);
      d.row_factor = (*lists.row_factor)[t].data_ptr<float>();
      d.col_factor = (*lists.col_factor)[t].data_ptr<float>();
    }
    if (n > 0) descs.push_back(d);
  }
  return descs;
}

struct Prepared {
  Tensor meta;
  Tensor scratch;  // the row/column slots of the fixed-order sums (kept alive until the launch)
  dc::FactoredScratch sizes{nullptr, 0, 0};
  int count = 0;
  int64_t blocks = 0;
  cudaStream_t stream = nullptr;
  const dc::FactoredDesc* ptr() const { return reinterpret_cast<const dc::FactoredDesc*>(meta.data_ptr()); }
};

// `row_col`: the launch adds into row_out / col_out, so it needs the scratch slots and distinct
// output buffers per descriptor (one thread adds each output).
Prepared prepare_factored(std::vector<dc::FactoredDesc>& descs, const at::Device& device, bool row_col = false) {
  Prepared prepared;
  prepared.count = static_cast<int>(descs.size());
  if (descs.empty()) return prepared;
  prepared.blocks = dc::dc_prepare_factored(descs.data(), prepared.count);
  if (row_col) {
    for (size_t a = 0; a < descs.size(); ++a) {
      for (size_t b = a + 1; b < descs.size(); ++b) {
        TORCH_CHECK(descs[a].row_out != descs[b].row_out && descs[a].col_out != descs[b].col_out,
                    "dist_cautious CUDA kernels: two fragments of one launch add into the same row/column sums");
      }
    }
    prepared.sizes = dc::dc_factored_scratch(descs.data(), prepared.count);
    prepared.scratch = at::empty({prepared.sizes.floats}, at::TensorOptions().dtype(at::kFloat).device(device));
    prepared.sizes.slots = prepared.scratch.data_ptr<float>();
  }
  prepared.stream = current_stream(device);
  prepared.meta = device_descriptors(descs, device, prepared.stream);
  return prepared;
}

// One float64 partial per block for the fixed-order sums of squares; each out_index once.
// (Called after the descriptors were built, so every out_index is known to lie in [0, slots).)
Tensor sumsq_partials(int64_t blocks, const std::vector<int64_t>& out_index, int64_t slots, const at::Device& device) {
  std::vector<bool> seen(static_cast<size_t>(slots), false);
  for (int64_t index : out_index) {
    TORCH_CHECK(!seen[index], "dist_cautious CUDA kernels: out_index ", index, " appears twice in one sum-of-squares launch");
    seen[index] = true;
  }
  return at::empty({blocks}, at::TensorOptions().dtype(at::kDouble).device(device));
}

void came_factored_sq_sums(const std::vector<Tensor>& grads, const std::vector<int64_t>& starts, const std::vector<int64_t>& batches,
                           const std::vector<int64_t>& rows, const std::vector<int64_t>& cols, const std::vector<Tensor>& row_sums,
                           const std::vector<Tensor>& col_sums, double eps1) {
  if (grads.empty()) return;
  at::Device device = grads[0].device();
  DeviceGuard guard(device);
  std::vector<int64_t> out_index(grads.size());
  for (size_t t = 0; t < grads.size(); ++t) out_index[t] = static_cast<int64_t>(t);
  FactoredLists lists;
  lists.grads = &grads;
  lists.starts = &starts;
  lists.batches = &batches;
  lists.rows = &rows;
  lists.cols = &cols;
  lists.row_out = &row_sums;
  lists.col_out = &col_sums;
  lists.out_index = &out_index;
  TORCH_CHECK(row_sums.size() == grads.size() && col_sums.size() == grads.size(), "dist_cautious CUDA kernels: sum buffers length");
  auto descs = factored_descs(lists, device);
  Prepared p = prepare_factored(descs, device, /*row_col=*/true);
  if (!p.count) return;
  check_launch(dc::launch_came_factored_sq_sums(p.ptr(), p.count, p.blocks, static_cast<float>(eps1), p.sizes, p.stream), "came_factored_sq_sums");
}

void came_factored_sumsq(const std::vector<Tensor>& grads, const std::vector<int64_t>& starts, const std::vector<int64_t>& batches,
                         const std::vector<int64_t>& rows, const std::vector<int64_t>& cols, const std::vector<Tensor>& row_factor,
                         const std::vector<Tensor>& col_factor, const std::vector<int64_t>& out_index, Tensor sums) {
  if (grads.empty()) return;
  at::Device device = grads[0].device();
  DeviceGuard guard(device);
  TORCH_CHECK(on_device(sums) && sums.scalar_type() == at::kDouble && sums.is_contiguous(), "dist_cautious CUDA kernels: sums must be a contiguous float64 CUDA tensor");
  TORCH_CHECK(row_factor.size() == grads.size() && col_factor.size() == grads.size(), "dist_cautious CUDA kernels: factor lists length");
  FactoredLists lists;
  lists.grads = &grads;
  lists.starts = &starts;
  lists.batches = &batches;
  lists.rows = &rows;
  lists.cols = &cols;
  lists.row_factor = &row_factor;
  lists.col_factor = &col_factor;
  lists.out_index = &out_index;
  lists.out_limit = sums.numel();
  auto descs = factored_descs(lists, device);
  Prepared p = prepare_factored(descs, device);
  if (!p.count) return;
  Tensor partials = sumsq_partials(p.blocks, out_index, sums.numel(), device);
  check_launch(dc::launch_came_factored_sumsq(p.ptr(), p.count, p.blocks, sums.data_ptr<double>(), partials.data_ptr<double>(), p.stream),
               "came_factored_sumsq");
}

void came_factored_momentum(const std::vector<Tensor>& grads, const std::vector<Tensor>& exp_avgs, const std::vector<int64_t>& starts,
                            const std::vector<int64_t>& batches, const std::vector<int64_t>& rows, const std::vector<int64_t>& cols,
                            const std::vector<Tensor>& row_factor, const std::vector<Tensor>& col_factor, const std::vector<Tensor>& res_row_sums,
                            const std::vector<Tensor>& res_col_sums, const std::vector<int64_t>& out_index, Tensor divisors, double beta1,
                            double one_minus_beta1, double eps2, Tensor counts) {
  if (grads.empty()) return;
  at::Device device = grads[0].device();
  DeviceGuard guard(device);
  check_state(divisors, "clip divisors", device, -1);
  TORCH_CHECK(on_device(counts) && counts.scalar_type() == at::kLong && counts.is_contiguous(), "dist_cautious CUDA kernels: counts must be a contiguous int64 CUDA tensor");
  TORCH_CHECK(exp_avgs.size() == grads.size() && row_factor.size() == grads.size() && col_factor.size() == grads.size() &&
                  res_row_sums.size() == grads.size() && res_col_sums.size() == grads.size(),
              "dist_cautious CUDA kernels: came_factored_momentum lists differ in length");
  FactoredLists lists;
  lists.grads = &grads;
  lists.exp_avgs = &exp_avgs;
  lists.starts = &starts;
  lists.batches = &batches;
  lists.rows = &rows;
  lists.cols = &cols;
  lists.row_factor = &row_factor;
  lists.col_factor = &col_factor;
  lists.row_out = &res_row_sums;
  lists.col_out = &res_col_sums;
  lists.out_index = &out_index;
  lists.out_limit = std::min(counts.numel(), divisors.numel());
  auto descs = factored_descs(lists, device);
  Prepared p = prepare_factored(descs, device, /*row_col=*/true);
  if (!p.count) return;
  check_launch(dc::launch_came_factored_momentum(p.ptr(), p.count, p.blocks, divisors.data_ptr<float>(), static_cast<float>(beta1),
                                                 static_cast<float>(one_minus_beta1), static_cast<float>(eps2),
                                                 reinterpret_cast<unsigned long long*>(counts.data_ptr<int64_t>()), p.sizes, p.stream),
               "came_factored_momentum");
}

void came_factored_apply(const std::vector<Tensor>& params, const std::vector<Tensor>& grads, const std::vector<Tensor>& exp_avgs,
                         const std::vector<int64_t>& starts, const std::vector<int64_t>& batches, const std::vector<int64_t>& rows,
                         const std::vector<int64_t>& cols, const std::vector<Tensor>& row_factor, const std::vector<Tensor>& col_factor,
                         const std::vector<int64_t>& out_index, const std::vector<double>& decays, const std::vector<double>& neg_lrs,
                         const std::optional<Tensor>& scales, int64_t num_scales, const std::optional<Tensor>& step_scalars) {
  if (grads.empty()) return;
  at::Device device = grads[0].device();
  DeviceGuard guard(device);
  const float* table = step_scalar_table(step_scalars, device, num_scales, "came_factored_apply", {decays.size(), neg_lrs.size()}, "decays, neg_lrs");
  TORCH_CHECK(params.size() == grads.size() && exp_avgs.size() == grads.size() && row_factor.size() == grads.size() &&
                  col_factor.size() == grads.size(),
              "dist_cautious CUDA kernels: came_factored_apply lists differ in length");
  FactoredLists lists;
  lists.params = &params;
  lists.grads = &grads;
  lists.exp_avgs = &exp_avgs;
  lists.starts = &starts;
  lists.batches = &batches;
  lists.rows = &rows;
  lists.cols = &cols;
  lists.row_factor = &row_factor;
  lists.col_factor = &col_factor;
  lists.out_index = &out_index;
  lists.out_limit = num_scales;
  lists.decays = table ? nullptr : &decays;
  lists.neg_lrs = table ? nullptr : &neg_lrs;
  auto descs = factored_descs(lists, device);
  const float* scale_ptr = optional_scales(scales, device, num_scales);
  Prepared p = prepare_factored(descs, device);
  if (!p.count) return;
  check_launch(dc::launch_came_factored_apply(p.ptr(), p.count, p.blocks, scale_ptr, table, p.stream),
               "came_factored_apply");
}

// The run table of came_factor_update in device memory: uploaded once per distinct list of runs
// and device, then reused (a step plan keeps its runs, so every later call finds it here and
// launches with no host-to-device copy; one first needed while capturing is copied from a kept
// host buffer, see upload_bytes_for_capture).
// Keyed by content, so a caller needs no handle; the map is never destroyed (device memory must
// not be freed after the CUDA context at exit) and holds a few tables per model. The upload is
// ordered on `stream` before the first launch that reads it; later launches only read it.
const Tensor& factor_run_table(const std::vector<int64_t>& run_rows_per_matrix, const std::vector<int64_t>& run_rows,
                               const std::vector<dc::FactorRun>& table, const at::Device& device, cudaStream_t stream) {
  using Key = std::tuple<int, int, std::vector<int64_t>>;
  static auto* tables = new std::map<Key, Tensor>();
  static std::mutex mutex;
  std::vector<int64_t> runs(run_rows_per_matrix);
  runs.insert(runs.end(), run_rows.begin(), run_rows.end());
  Key key{static_cast<int>(device.type()), static_cast<int>(device.index()), std::move(runs)};
  std::lock_guard<std::mutex> lock(mutex);
  auto found = tables->find(key);
  if (found == tables->end()) {
    found = tables->emplace(std::move(key), upload_table(table.data(), table.size() * sizeof(dc::FactorRun), device, stream,
                                                         stream_capturing(stream))).first;
  }
  return found->second;
}

// CAME's factor math over one segment's flat buffers (came_factors.cu), the same entry point and
// checks as the CPU kernels' came_factor_update. `run_rows_per_matrix` / `run_rows`: the (R, rows)
// runs of whole matrices in row order.
void came_factor_update(const Tensor& row_state, const Tensor& col_state, const Tensor& row_sums, const Tensor& col_sums,
                        const Tensor& row_counts, const Tensor& col_counts, const std::vector<int64_t>& run_rows_per_matrix,
                        const std::vector<int64_t>& run_rows, double beta, double one_minus_beta, const Tensor& row_factor,
                        const Tensor& col_factor, const Tensor& means) {
  TORCH_CHECK(run_rows_per_matrix.size() == run_rows.size(), "dist_cautious CUDA kernels: came_factor_update: ", run_rows_per_matrix.size(),
              " matrix heights for ", run_rows.size(), " runs");
  TORCH_CHECK(run_rows.size() <= static_cast<size_t>(INT32_MAX), "dist_cautious CUDA kernels: came_factor_update: too many runs");
  const at::Device device = row_state.device();
  DeviceGuard guard(device);
  const int64_t rows = row_state.numel(), cols = col_state.numel();
  int64_t covered = 0, matrices = 0;
  for (size_t r = 0; r < run_rows.size(); ++r) {
    const int64_t R = run_rows_per_matrix[r], n = run_rows[r];
    TORCH_CHECK(R > 0 && n >= 0 && n % R == 0, "dist_cautious CUDA kernels: came_factor_update: run ", r, " of ", n,
                " rows is not whole matrices of ", R, " rows");
    covered += n;
    matrices += n / R;
  }
  TORCH_CHECK(covered == rows, "dist_cautious CUDA kernels: came_factor_update: runs cover ", covered, " rows, the row state has ", rows);
  check_state(row_state, "row state", device, rows);
  check_state(col_state, "column state", device, cols);
  check_state(row_sums, "row sums", device, rows);
  check_state(col_sums, "column sums", device, cols);
  check_state(row_counts, "row counts", device, rows);
  check_state(col_counts, "column counts", device, cols);
  check_state(row_factor, "row factor", device, rows);
  check_state(col_factor, "column factor", device, cols);
  check_state(means, "means", device, matrices);
  std::vector<dc::FactorRun> table(run_rows.size());
  dc::FactorPlan plan = dc::dc_prepare_factor_runs(run_rows_per_matrix.data(), run_rows.data(), static_cast<int>(run_rows.size()), table.data());
  table.resize(static_cast<size_t>(plan.runs));
  if (rows == 0 && cols == 0) return;
  const cudaStream_t stream = current_stream(device);
  const dc::FactorRun* runs = nullptr;
  if (plan.runs > 0) runs = reinterpret_cast<const dc::FactorRun*>(factor_run_table(run_rows_per_matrix, run_rows, table, device, stream).data_ptr());
  dc::FactorSpans spans{row_state.data_ptr<float>(), col_state.data_ptr<float>(), row_sums.data_ptr<float>(), col_sums.data_ptr<float>(),
                        row_counts.data_ptr<float>(), col_counts.data_ptr<float>(), row_factor.data_ptr<float>(), col_factor.data_ptr<float>(),
                        means.data_ptr<float>(), rows, cols};
  check_launch(dc::launch_came_factor_update(spans, runs, plan, static_cast<float>(beta), static_cast<float>(one_minus_beta), stream),
               "came_factor_update");
}

// The per-tensor step scalars (step_scalars.cu): a new fp32 vector with one value per tensor of
// the batch, from `values` and a second vector of the same length (the CPU kernels' checks).
Tensor per_tensor_result(const Tensor& values, const Tensor& other, const char* what, const char* other_what) {
  const at::Device device = values.device();
  TORCH_CHECK(values.dim() == 1, "dist_cautious CUDA kernels: ", what, " must be a vector, got ", values.dim(), " dimensions");
  check_state(values, what, device, -1);
  check_state(other, other_what, device, values.numel());
  return at::empty({values.numel()}, values.options());
}

// reference.mask_scales: 1 / max(counts / sizes, 1e-3) per tensor, in one launch.
Tensor mask_scales(const Tensor& counts, const Tensor& sizes) {
  const at::Device device = counts.device();
  DeviceGuard guard(device);
  Tensor out = per_tensor_result(counts, sizes, "counts", "sizes");
  check_launch(dc::launch_mask_scales(counts.data_ptr<float>(), sizes.data_ptr<float>(), out.data_ptr<float>(), counts.numel(),
                                      current_stream(device)),
               "mask_scales");
  return out;
}

// reference.came_clip_divisors: max(sqrt(sumsq) / sqrt_sizes / clip_threshold, 1) per tensor, in
// one launch. torch divides a tensor by a Python scalar on CUDA as x * (1 / fp32(s)), the
// reciprocal formed on the host in fp32 (div_true_kernel_cuda): the same factor here.
Tensor came_clip_divisors(const Tensor& sumsq, const Tensor& sqrt_sizes, double clip_threshold) {
  const at::Device device = sumsq.device();
  DeviceGuard guard(device);
  Tensor out = per_tensor_result(sumsq, sqrt_sizes, "sums of squares", "square roots of the sizes");
  const float inv_threshold = 1.0f / static_cast<float>(clip_threshold);
  check_launch(dc::launch_came_clip_divisors(sumsq.data_ptr<float>(), sqrt_sizes.data_ptr<float>(), inv_threshold, out.data_ptr<float>(),
                                             sumsq.numel(), current_stream(device)),
               "came_clip_divisors");
  return out;
}

}  // namespace

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  namespace py = pybind11;
  m.doc() = "dist_cautious fused multi-tensor CUDA kernels (see dist_cautious/kernels/cuda_ops.py)";
  // The apply ops' last argument, step_scalars, defaults to None: a call without it behaves as
  // before the argument existed. Their arguments carry the names of the op schemas
  // (dist_cautious/kernels/cuda_library.py).
  const auto no_table = py::arg("step_scalars") = py::none();
  m.def("lerp_mask_counts", &lerp_mask_counts, "int64 counts of lerp(m, g, w) * g > 0 (sign(...) for Lion), per tensor");
  m.def("adamw_apply", &adamw_apply, "fused AdamW step over a list of flat tensors", py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("exp_avg_sqs"), py::arg("alphas"), py::arg("bc2_sqrts"), py::arg("decays"), py::arg("lerp_weight"), py::arg("beta2"),
        py::arg("one_minus_beta2"), py::arg("eps"), py::arg("scales"), no_table);
  m.def("lion_apply", &lion_apply, "fused Lion step over a list of flat tensors", py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("decays"), py::arg("weight1"), py::arg("weight2"), py::arg("neg_lrs"), py::arg("scales"), no_table);
  m.def("came_vector_second_moment", &came_vector_second_moment, "CAME 1-D second moment");
  m.def("came_vector_sumsq", &came_vector_sumsq, "CAME 1-D update sum of squares (float64 accumulators)");
  m.def("came_vector_momentum", &came_vector_momentum, "CAME 1-D momentum and mask counts");
  m.def("came_vector_apply", &came_vector_apply, "CAME 1-D final update", py::arg("params"), py::arg("grads"), py::arg("exp_avgs"),
        py::arg("preconds"), py::arg("has_precond"), py::arg("out_index"), py::arg("decays"), py::arg("neg_lrs"), py::arg("scales"),
        py::arg("num_scales"), no_table);
  m.def("came_factored_sq_sums", &came_factored_sq_sums, "CAME row/col partial sums of g^2 + eps1");
  m.def("came_factored_sumsq", &came_factored_sumsq, "CAME factored update sum of squares");
  m.def("came_factored_momentum", &came_factored_momentum, "CAME momentum, residual row/col sums and mask counts");
  m.def("came_factored_apply", &came_factored_apply, "CAME factored final update", py::arg("params"), py::arg("grads"),
        py::arg("exp_avgs"), py::arg("starts"), py::arg("batches"), py::arg("rows"), py::arg("cols"), py::arg("row_factor"),
        py::arg("col_factor"), py::arg("out_index"), py::arg("decays"), py::arg("neg_lrs"), py::arg("scales"), py::arg("num_scales"),
        no_table);
  m.def("came_factor_update", &came_factor_update, "CAME factor math between reductions: EMAs, per-matrix means, rsqrt factors");
  m.def("mask_scales", &mask_scales, "cautious mask scales 1 / max(count / size, 1e-3) per tensor, one launch");
  m.def("came_clip_divisors", &came_clip_divisors, "CAME RMS-clip divisors max(sqrt(sumsq) / sqrt(N) / d, 1) per tensor, one launch");
  m.def("descriptor_uploads", [] { return table_uploads.load(); },
        "test hook: descriptor and run tables uploaded to the device so far (the rest were found kept there)");
  def_emulation_hooks(m);
}
