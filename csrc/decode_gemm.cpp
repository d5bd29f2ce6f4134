// The decode + cuBLAS path (host only): decode the whole NF4 weight in one launch into a workspace, then one cuBLAS
// GEMM per product, with the LoRA terms as skinny cuBLAS GEMMs. Ops `_decode_gemm_fwd` and `_decode_gemm_bwd`
// (the path signatures of path_ops.h).
// Twin (the spec): reference.qlora_linear / qlora_linear_backward; rounding as the reference within the ratio rule
// (fp32 accumulation inside cuBLAS, one rounding per GEMM output).
//
// Why it exists: on GPUs where the fused mma.sync kernels reach only a fraction of the tensor-core rate (Hopper:
// cuBLAS uses wgmma), decoding W at memory bandwidth and letting cuBLAS do the GEMM is faster at large m. The
// decode moves 0.5 B/element in and 2 B/element out (4096x14336: 29 MB + 117 MB, ~34 µs at 4.3 TB/s), small next
// to a GEMM of m >= 2048 rows (~0.3 ms at m = 2048 for that shape).
//
// The decoded weight lives in the paths' shared scratch (stream_scratch, csrc/workspace.cpp): one buffer per
// (device, dtype, stream) the size of the largest weight decoded so far, reused by every layer.
#include <tuple>

#include <ATen/ATen.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <torch/library.h>

#include "common/checks.h"
#include "path_ops.h"

namespace qlora_ext {
namespace {

// w decoded to like's dtype as an [n, k] view of the decoded-weight scratch; valid until the next decode on this
// stream.
at::Tensor decoded(const OptionalTensorList& w, int64_t n, int64_t k, const at::Tensor& like) {
  static const auto dequantize_nf4_out =
      find_op<void(const OptionalTensorList&, const at::Tensor&)>("qlora_ext::_dequantize_nf4_out");
  at::Tensor out = stream_scratch(ScratchSlot::kDecodedWeight, n * k, like.options()).view({n, k});
  dequantize_nf4_out.call(w, out);
  return out;
}

// The checks of the fused kernels' wrappers (x first): the path serves the same calls. -> (m, k, n).
std::tuple<int64_t, int64_t, int64_t> check_path_args(const char* op, const at::Tensor& x, const at::Tensor& lora_A,
                                                      const at::Tensor& lora_B, double dropout_p) {
  check_activation(op, "x", x);
  check_2d(op, "lora_A", lora_A, "[r, k]");
  check_2d(op, "lora_B", lora_B, "[n, r]");
  const int64_t k = x.size(1), r = lora_A.size(0), n = lora_B.size(0);
  check_fast_path_sizes(op, k, r);
  check_matrix(op, "lora_A", lora_A, x.scalar_type(), "[r, k]", r, k, x.device());
  check_matrix(op, "lora_B", lora_B, x.scalar_type(), "[n, r]", n, r, x.device());
  check_dropout_p(op, dropout_p);
  return {x.size(0), k, n};
}

// Op qlora_ext::_decode_gemm_fwd -> (y [m, n], u [m, r]): u = dropout(x)·lora_Aᵀ; y = s·u·lora_Bᵀ + bias, then
// y += x·wᵀ in one cuBLAS GEMM (beta = 1).
//
// The LoRA term goes in first because cuBLAS then reads it as the GEMM's C operand while the GEMM is compute-bound;
// adding it afterwards re-reads and re-writes y (measured on an H200, 4096→14336: 1.04-1.12× the bare GEMM this
// way, 1.05-1.15× the other; scripts/probe_decode_gemm.py).
std::tuple<at::Tensor, at::Tensor> decode_gemm_fwd(const at::Tensor& x, const OptionalTensorList& w,
                                                   const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                   const std::optional<at::Tensor>& bias, double scaling,
                                                   double dropout_p, int64_t seed) {
  constexpr const char* kOp = "qlora_linear";
  const auto [m, k, n] = check_path_args(kOp, x, lora_A, lora_B, dropout_p);
  const c10::cuda::CUDAGuard guard(x.device());
  const KernelScope scope;
  const bool has_bias = check_bias(kOp, bias, n, x.scalar_type(), x.device());

  const at::Tensor x_drop = dropout_p > 0 ? lora_dropout(x, dropout_p, seed) : x;
  at::Tensor u = at::mm(x_drop, lora_A.t());
  // Without bias the first product is a plain mm with s folded into the smaller skinny operand (s·u: m·r
  // elements, or s·lora_B: n·r; a call's transient memory stays min(m, n)·r), not an addmm with beta = 0 into an
  // uninitialized y. The scaled operand is rounded to x's dtype once: exact for a power-of-two s (the default
  // lora_alpha / r), otherwise one more rounding of a skinny operand than an fp32 alpha, within the ratio rule.
  at::Tensor y = has_bias ? at::addmm(*bias, u, lora_B.t(), /*beta=*/1, /*alpha=*/scaling)
                 : m <= n ? at::mm(u.mul(scaling), lora_B.t())
                          : at::mm(u, lora_B.mul(scaling).t());
  if (m > 0) y.addmm_(x, decoded(w, n, k, x).t());
  return {y, u};
}

// Op qlora_ext::_decode_gemm_bwd -> (dx, dA, dB): g = s·dy·lora_B; dx = dy·w + mask(g·lora_A); dA, dB from the
// one _bwd_ab kernel.
//
// Without dropout the LoRA term is added after the big GEMM (dx.addmm_), which measured 1.03-1.16× the bare GEMM
// against 1.01-1.23× for adding it as C (scripts/probe_decode_gemm.py); with dropout the masked term must exist as
// a tensor anyway, so it is the GEMM's C operand.
std::tuple<at::Tensor, at::Tensor, at::Tensor> decode_gemm_bwd(const at::Tensor& dy, const at::Tensor& x,
                                                               const at::Tensor& u, const OptionalTensorList& w,
                                                               const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                               double scaling, double dropout_p, int64_t seed) {
  static const auto bwd_ab =
      find_op<std::tuple<at::Tensor, at::Tensor>(const at::Tensor&, const at::Tensor&, const at::Tensor&,
                                                 const at::Tensor&, double, double, int64_t)>("qlora_ext::_bwd_ab");
  constexpr const char* kOp = "qlora_linear_backward";
  const auto [m, k, n] = check_path_args(kOp, x, lora_A, lora_B, dropout_p);
  const c10::cuda::CUDAGuard guard(x.device());
  const KernelScope scope;
  check_matrix(kOp, "dy", dy, x.scalar_type(), "[m, n]", m, n, x.device());

  // g as a plain mm, s on the smaller operand (the forward's reasons; for m <= n on the product g itself, which
  // is then rounded twice: exact for a power-of-two s, otherwise within the ratio rule).
  const at::Tensor g = m <= n ? at::mm(dy, lora_B).mul_(scaling) : at::mm(dy, lora_B.mul(scaling));
  at::Tensor dx;
  if (m == 0) {
    dx = at::zeros({m, k}, dy.options());
  } else if (dropout_p > 0) {
    dx = lora_dropout(at::mm(g, lora_A), dropout_p, seed);
    dx.addmm_(dy, decoded(w, n, k, x));
  } else {
    dx = at::mm(dy, decoded(w, n, k, x));
    dx.addmm_(g, lora_A);
  }
  auto [dA, dB] = bwd_ab.call(dy, x, u, g, scaling, dropout_p, seed);
  return {dx, dA, dB};
}

}  // namespace
}  // namespace qlora_ext

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) {
  m.impl("_decode_gemm_fwd", &qlora_ext::decode_gemm_fwd);
  m.impl("_decode_gemm_bwd", &qlora_ext::decode_gemm_bwd);
}

