// Host side of the GEMM paths (qlora_ext.policy.PATHS): the two C++ signatures every path's ops share, so that one
// typed dispatcher handle type calls any path (csrc/qlora_autograd.cpp), and the scope their host code runs in.
//   forward op  (x, w, lora_A, lora_B, bias, scaling, dropout_p, seed) -> (y [m, n], u [m, r])   = _fused_fwd
//   backward op (dy, x, u, w, lora_A, lora_B, scaling, dropout_p, seed) -> (dx, dA, dB)
// x, dy, u, lora_A, lora_B arrive contiguous. A path's CUDA kernel must be registered with exactly these C++
// types (const references, double, int64_t): the dispatcher's typed handles compare them when looked up.
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <ATen/core/dispatch/Dispatcher.h>
#include <c10/core/DispatchKeySet.h>
#include <c10/core/impl/LocalDispatchKeySet.h>

namespace qlora_ext {

using OptionalTensorList = c10::List<std::optional<at::Tensor>>;  // C++ type of a `Tensor?[]` argument

using PathFwdFn = std::tuple<at::Tensor, at::Tensor>(const at::Tensor& x, const OptionalTensorList& w,
                                                     const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                     const std::optional<at::Tensor>& bias, double scaling,
                                                     double dropout_p, int64_t seed);
using PathBwdFn = std::tuple<at::Tensor, at::Tensor, at::Tensor>(const at::Tensor& dy, const at::Tensor& x,
                                                                 const at::Tensor& u, const OptionalTensorList& w,
                                                                 const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                                 double scaling, double dropout_p, int64_t seed);

// A qlora_ext op by its schema name, looked up once by the caller (keep the handle in a static): going through
// the dispatcher rather than linking to the kernel file's symbol lets a build leave that file out.
template <class Fn>
c10::TypedOperatorHandle<Fn> find_op(const char* name) {
  return c10::Dispatcher::singleton().findSchemaOrThrow(name, "").typed<Fn>();
}

// dropout(x) through the _lora_dropout op (csrc/lora_dropout.cu): the counter-based mask (idx = row·k + col) that
// every path and the reference share.
inline at::Tensor lora_dropout(const at::Tensor& x, double dropout_p, int64_t seed) {
  static const auto op = find_op<at::Tensor(const at::Tensor&, double, int64_t)>("qlora_ext::_lora_dropout");
  return op.call(x, dropout_p, seed);
}

// The scope of host code that composes ops: below autograd (its results are kernel outputs, never differentiated
// through, so nested ops skip the autograd layer and record no graph) and without autocast (the ops compute in
// their inputs' dtypes by contract, also when a backward runs inside an autocast region).
struct KernelScope {
  c10::impl::ExcludeDispatchKeyGuard guard{c10::autograd_dispatch_keyset_with_ADInplaceOrView |
                                           c10::autocast_dispatch_keyset};
};

// Scratch memory of the paths' host code (defined in csrc/workspace.cpp; qlora_ext.workspace_bytes() counts it,
// qlora_ext.release_workspace() frees it): `numel` elements of opts' dtype, a view of the one buffer of (device,
// dtype, slot), grown to the largest request so far and then reused by every call, so a layer call allocates no
// weight-sized memory in the steady state. The buffer belongs to the last stream that asked (another stream's
// request drops it; csrc/workspace.cpp says why that is safe); the contents are not kept between calls. While the
// stream is being captured into a CUDA graph a fresh tensor is returned (from the graph's pool), nothing cached.
enum class ScratchSlot : int { kDecodedWeight = 0, kGemvPartials = 1, kSm90 = 2, kDxPartials = 3 };
at::Tensor stream_scratch(ScratchSlot slot, int64_t numel, const at::TensorOptions& opts);

// At least `numel` int32 counters, zero, for the kernels of the current stream on `device` that count arrivals
// (split-k partial sums): every such kernel puts each counter it used back to zero before it ends, so one block
// per (device, stream), grown to the largest request, serves every later launch on the stream without a memset.
// While the stream is being captured a fresh zeroed block is returned (a captured memset), not cached.
at::Tensor stream_counters(const at::Device& device, int64_t numel);

}  // namespace qlora_ext
