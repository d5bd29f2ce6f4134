// Host-side argument checks shared by every op wrapper. Each failure names the op, the tensor, what was
// expected and what arrived, e.g.
//   "qlora_linear: lora_A must have shape [r, k] = [16, 4096], got [16, 4000]".
// Idiom: every wrapper declares `constexpr const char* kOp = "<op>";` and calls these unqualified.
// Python routes unsupported-but-valid cases to the reference before calling an internal op, so these fire only
// on misuse (or when an internal op is called directly).
#pragma once

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace qlora_ext {

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << '[';
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << ']';
  return o.str();
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }
inline bool aligned16(const void* p) { return (reinterpret_cast<uintptr_t>(p) & 15u) == 0; }

// 1 <= r <= 128 (register/smem budget of the LoRA tiles), k % 64 == 0 (one NF4 block never straddles rows, and
// 16-byte vector loads along k stay aligned).
constexpr int64_t kMaxRank = 128;
constexpr int64_t kKMultiple = 64;

inline void check_device(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " (the device of the first input), "
              "got ", t.device());
}

inline void check_dtype(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype) {
  TORCH_CHECK(t.scalar_type() == dtype, op, ": ", name, " must have dtype ", dtype, ", got ",
              t.scalar_type());
}

inline void check_contiguous(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_contiguous(), op, ": ", name, " must be contiguous (row-major), got strides ",
              shape_str(t.strides()), " for shape ", shape_str(t.sizes()));
}

// bf16 or fp16 activations (the only dtypes with tensor-core kernels here).
inline void check_half_dtype(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.scalar_type() == at::kBFloat16 || t.scalar_type() == at::kHalf, op, ": ", name,
              " must be bfloat16 or float16, got ", t.scalar_type());
}

// 2-D tensor of exactly [d0, d1]; dims_desc names the symbols, e.g. "[r, k]".
inline void check_shape2(const char* op, const char* name, const at::Tensor& t, const char* dims_desc,
                         int64_t d0, int64_t d1) {
  TORCH_CHECK(t.dim() == 2 && t.size(0) == d0 && t.size(1) == d1, op, ": ", name, " must have shape ",
              dims_desc, " = [", d0, ", ", d1, "], got ", shape_str(t.sizes()));
}

// 2-D of any size (read a size off a tensor only after this); dims_desc as above.
inline void check_2d(const char* op, const char* name, const at::Tensor& t, const char* dims_desc) {
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D ", dims_desc, ", got shape ", shape_str(t.sizes()));
}

// A dense operand of the fused kernels: CUDA on the op's device, given dtype, shape [d0, d1], contiguous.
inline void check_matrix(const char* op, const char* name, const at::Tensor& t, at::ScalarType dtype,
                         const char* dims_desc, int64_t d0, int64_t d1, const at::Device& device) {
  check_device(op, name, t, device);
  check_dtype(op, name, t, dtype);
  check_shape2(op, name, t, dims_desc, d0, d1);
  check_contiguous(op, name, t);
}

// The activation that fixes dtype and device for the op (x in forward / bwd_ab, dy in bwd_dx):
// CUDA, bf16/fp16, 2-D [rows, cols], contiguous.
inline void check_activation(const char* op, const char* name, const at::Tensor& t) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  check_half_dtype(op, name, t);
  TORCH_CHECK(t.dim() == 2, op, ": ", name, " must be 2-D [rows, cols] (flatten leading dims), got shape ",
              shape_str(t.sizes()));
  check_contiguous(op, name, t);
}

// The shapes every tensor-core kernel here requires (Python sends anything else to the reference).
inline void check_fast_path_sizes(const char* op, int64_t k, int64_t r) {
  TORCH_CHECK(k > 0 && k % kKMultiple == 0, op, ": k (in_features) must be a positive multiple of ",
              kKMultiple, " on the CUDA path, got k = ", k);
  TORCH_CHECK(r >= 1 && r <= kMaxRank, op, ": rank r must satisfy 1 <= r <= ", kMaxRank,
              " on the CUDA path, got r = ", r);
}

inline void check_dropout_p(const char* op, double p) {
  TORCH_CHECK(p >= 0.0 && p < 1.0, op, ": dropout_p must be in [0, 1), got ", p);
}

// Optional bias [n] in the activation dtype; returns whether one was given.
inline bool check_bias(const char* op, const std::optional<at::Tensor>& bias, int64_t n, at::ScalarType dtype,
                       const at::Device& device) {
  if (!bias.has_value() || !bias->defined()) return false;
  check_device(op, "bias", *bias, device);
  check_dtype(op, "bias", *bias, dtype);
  TORCH_CHECK(bias->dim() == 1 && bias->size(0) == n, op, ": bias must have shape [n] = [", n, "], got ",
              shape_str(bias->sizes()));
  check_contiguous(op, "bias", *bias);
  return true;
}

// Vector loads need the tensor's first byte on a `bytes` boundary; a view with a storage offset may not be.
inline void check_aligned(const char* op, const char* name, const at::Tensor& t, int64_t bytes) {
  TORCH_CHECK(reinterpret_cast<uintptr_t>(t.data_ptr()) % static_cast<uintptr_t>(bytes) == 0, op, ": ", name,
              " must start on a ", bytes, "-byte boundary for vector loads (got a view with a misaligned "
              "storage offset); pass ", name, ".clone()");
}

// Limits of the 2-D-grid tile GEMMs (qlora_fwd, qlora_bwd_dx): ceil(m / block_m) CTA rows fit gridDim.y
// (65535), and the packed weight starts on a 16-byte boundary (threads cp.async 16-byte chunks of it).
inline void check_gemm_limits(const char* op, int64_t m, int64_t block_m, const at::Tensor& w_nf4) {
  TORCH_CHECK(ceil_div(m, block_m) <= 65535, op, ": m = ", m, " exceeds the kernel's grid limit of ",
              int64_t(65535) * block_m, " rows");
  check_aligned(op, "w_nf4", w_nf4, 16);
}

}  // namespace qlora_ext
