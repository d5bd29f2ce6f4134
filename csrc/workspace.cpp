// The CUDA paths' shared scratch (host only): stream_scratch and stream_counters of path_ops.h, and the ops
// `_workspace_bytes` / `_release_workspace` behind qlora_ext.workspace_bytes() / release_workspace().
//
// stream_scratch: one buffer per (device, dtype, slot), shared by every layer, sized by the largest request so far
// (it grows once per new maximum and is then reused by every call). Its users: the decoded weight of the decode +
// cuBLAS path, the split partial sums of the small-m kernel and of the fused dx kernel, the sm90 path's block scales
// and repacked weight. The buffer belongs to the stream that last asked for it: within one stream successive calls
// are ordered, so reuse is safe. A request from another stream drops the buffer and allocates a new one on the
// asking stream: dropping hands the block back to PyTorch's caching allocator, which gives it out again only to
// later work of the old stream (stream-ordered after every kernel that used it), so no wait is needed. Why not one
// buffer per stream: streams come and go (a CUDA-graph warm-up runs on a fresh side stream; torch's stream pool
// has 32 per device), and a weight-sized buffer held for each of them added up to 7 GiB in one benchmark run.
// A caller's view keeps its buffer alive, so a drop or release while a call runs is safe too.
// stream_counters: the zeroed arrival counters of the split kernels, which leave them zero, one block per (device,
// stream): a few KiB, so per stream is fine.
#include <algorithm>
#include <map>
#include <mutex>
#include <tuple>
#include <utility>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "path_ops.h"

namespace qlora_ext {
namespace {

using ScratchKey = std::tuple<c10::DeviceIndex, at::ScalarType, int>;
struct Held {
  c10::StreamId stream = 0;  // the stream the buffer was allocated on and is used by
  at::Tensor buf;
};

std::mutex scratch_mutex;
// Leaked on purpose (both maps): destroying them at exit would free CUDA memory after the driver has shut down.
auto* scratch = new std::map<ScratchKey, Held>();
auto* counters = new std::map<std::pair<c10::DeviceIndex, c10::StreamId>, at::Tensor>();

// While a stream is being captured into a CUDA graph, nothing is cached: the capture gets tensors of its own pool.
bool capturing(const c10::cuda::CUDAStream& stream) {
  cudaStreamCaptureStatus status = cudaStreamCaptureStatusNone;
  C10_CUDA_CHECK(cudaStreamIsCapturing(stream.stream(), &status));
  return status != cudaStreamCaptureStatusNone;
}

int64_t workspace_bytes() {
  const std::lock_guard<std::mutex> lock(scratch_mutex);
  int64_t bytes = 0;
  for (const auto& [key, held] : *scratch) bytes += held.buf.nbytes();
  return bytes;
}

// The memory returns to PyTorch's caching allocator (torch.cuda.empty_cache() hands it back to the driver). The
// counter blocks stay: they are a few KiB and must stay zero.
void release_workspace() {
  const std::lock_guard<std::mutex> lock(scratch_mutex);
  scratch->clear();
}

}  // namespace

at::Tensor stream_scratch(ScratchSlot slot, int64_t numel, const at::TensorOptions& opts) {
  const c10::DeviceIndex device = opts.device().index();
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device);
  if (capturing(stream)) return at::empty({numel}, opts);
  at::Tensor buf;
  {
    const std::lock_guard<std::mutex> lock(scratch_mutex);
    Held& held = (*scratch)[{device, opts.dtype().toScalarType(), static_cast<int>(slot)}];
    if (!held.buf.defined() || held.buf.numel() < numel || held.stream != stream.id()) {
      held.buf = at::Tensor();  // free the old buffer (to its stream's pool) before allocating the new one
      held.buf = at::empty({numel}, opts);
      held.stream = stream.id();
    }
    buf = held.buf;
  }
  return buf.narrow(0, 0, numel);
}

at::Tensor stream_counters(const at::Device& device, int64_t numel) {
  const c10::cuda::CUDAStream stream = c10::cuda::getCurrentCUDAStream(device.index());
  const auto opts = at::TensorOptions().dtype(at::kInt).device(device);
  if (capturing(stream)) return at::zeros({numel}, opts);
  const std::lock_guard<std::mutex> lock(scratch_mutex);
  at::Tensor& held = (*counters)[{device.index(), stream.id()}];
  if (!held.defined() || held.numel() < numel) held = at::zeros({std::max<int64_t>(numel, 1024)}, opts);
  return held;
}

}  // namespace qlora_ext

// No tensor arguments: CompositeExplicitAutograd is the kernel the dispatcher runs for such ops.
TORCH_LIBRARY_IMPL(qlora_ext, CompositeExplicitAutograd, m) {
  m.impl("_workspace_bytes", &qlora_ext::workspace_bytes);
  m.impl("_release_workspace", &qlora_ext::release_workspace);
}
