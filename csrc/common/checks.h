// Host-side argument checks shared by every CUDA wrapper. Each failure names the op, the tensor, what was
// expected and what arrived, e.g.
//   "qlora_linear: lora_A must have shape [r, k] = [16, 4096], got [16, 4000]".
// Python routes unsupported-but-valid cases to the reference before calling _C, so these fire only on misuse.
#pragma once

#include <cstdint>
#include <optional>
#include <sstream>
#include <string>

#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

namespace qlora_checks {

inline std::string shape_str(at::IntArrayRef s) {
  std::ostringstream o;
  o << '[';
  for (size_t i = 0; i < s.size(); ++i) o << (i ? ", " : "") << s[i];
  o << ']';
  return o.str();
}

// 1 <= r <= 128 (register/smem budget of the LoRA tiles), k % 64 == 0 (one NF4 block never straddles rows, and
// 16-byte vector loads along k stay aligned), blocksize == 64 (the only decode the fast kernels implement).
constexpr int64_t kMaxRank = 128;
constexpr int64_t kKMultiple = 64;
constexpr int64_t kFastBlocksize = 64;

inline void check_device(const char* op, const char* name, const at::Tensor& t, const at::Device& device) {
  TORCH_CHECK(t.is_cuda(), op, ": ", name, " must be a CUDA tensor, got device ", t.device());
  TORCH_CHECK(t.device() == device, op, ": ", name, " must be on ", device, " (the device of x), got ",
              t.device());
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

// A dense operand of the fused kernels: CUDA on x's device, given dtype, shape [d0, d1], contiguous.
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

// Fast-path size limits (contract "Fast-path conditions").
inline void check_fast_path_sizes(const char* op, int64_t k, int64_t r) {
  TORCH_CHECK(k > 0 && k % kKMultiple == 0, op, ": k (in_features) must be a positive multiple of ",
              kKMultiple, " on the CUDA path, got k = ", k);
  TORCH_CHECK(r >= 1 && r <= kMaxRank, op, ": rank r must satisfy 1 <= r <= ", kMaxRank,
              " on the CUDA path, got r = ", r);
}

inline void check_fast_blocksize(const char* op, int64_t blocksize) {
  TORCH_CHECK(blocksize == kFastBlocksize, op, ": blocksize must be ", kFastBlocksize,
              " on the CUDA path, got ", blocksize);
}

inline int64_t ceil_div(int64_t a, int64_t b) { return (a + b - 1) / b; }

// An optional NF4 side tensor counts as given only when it holds data: the quantize op returns empty [0]
// tensors for nested_absmax/offset without double quant, and callers may pass those straight back.
inline bool given(const std::optional<at::Tensor>& t) { return t.has_value() && t->defined() && t->numel() > 0; }

// The six NF4 storage tensors of a [n, k] weight (contract "NF4 storage tensors"), all on `device`.
// Double quant <=> absmax is uint8; then nested_absmax, nested_code and offset must all be given.
// w_nf4 may be 1-D or bnb's ((n*k+1)//2, 1); either way it must be contiguous with (n*k+1)//2 bytes.
inline void check_nf4_weight(const char* op, const at::Tensor& w_nf4, const at::Tensor& absmax,
                             const at::Tensor& code, const std::optional<at::Tensor>& nested_absmax,
                             const std::optional<at::Tensor>& nested_code,
                             const std::optional<at::Tensor>& offset, int64_t n, int64_t k,
                             int64_t blocksize, const at::Device& device) {
  TORCH_CHECK(n >= 1 && k >= 1, op, ": weight shape must be positive, got [n, k] = [", n, ", ", k, "]");
  TORCH_CHECK(blocksize >= 1, op, ": blocksize must be positive, got ", blocksize);
  const int64_t numel = n * k;
  const int64_t nbytes = (numel + 1) / 2;
  const int64_t nblocks = ceil_div(numel, blocksize);

  check_device(op, "w_nf4", w_nf4, device);
  check_dtype(op, "w_nf4", w_nf4, at::kByte);
  TORCH_CHECK(w_nf4.numel() == nbytes && (w_nf4.dim() == 1 || (w_nf4.dim() == 2 && w_nf4.size(1) == 1)),
              op, ": w_nf4 must have shape [(n*k+1)//2] = [", nbytes, "] (or [", nbytes,
              ", 1]) for [n, k] = [", n, ", ", k, "], got ", shape_str(w_nf4.sizes()));
  check_contiguous(op, "w_nf4", w_nf4);

  check_device(op, "code", code, device);
  check_dtype(op, "code", code, at::kFloat);
  TORCH_CHECK(code.dim() == 1 && code.numel() == 16, op, ": code must have shape [16], got ",
              shape_str(code.sizes()));
  check_contiguous(op, "code", code);

  check_device(op, "absmax", absmax, device);
  TORCH_CHECK(absmax.numel() == nblocks && (absmax.dim() == 1 || (absmax.dim() == 2 && absmax.size(1) == 1)),
              op, ": absmax must have shape [ceil(n*k/blocksize)] = [", nblocks, "], got ",
              shape_str(absmax.sizes()));
  check_contiguous(op, "absmax", absmax);

  const bool dq = absmax.scalar_type() == at::kByte;
  const int present = int(given(nested_absmax)) + int(given(nested_code)) + int(given(offset));
  if (dq) {
    TORCH_CHECK(present == 3, op, ": absmax is uint8 (double quant), so nested_absmax, nested_code and offset "
                "must all be given, got ", present, " of 3");
    const int64_t nnested = ceil_div(nblocks, 256);
    const at::Tensor& na = *nested_absmax;
    check_device(op, "nested_absmax", na, device);
    check_dtype(op, "nested_absmax", na, at::kFloat);
    TORCH_CHECK(na.dim() == 1 && na.numel() == nnested, op,
                ": nested_absmax must have shape [ceil(nblocks/256)] = [", nnested, "], got ",
                shape_str(na.sizes()));
    check_contiguous(op, "nested_absmax", na);
    const at::Tensor& nc = *nested_code;
    check_device(op, "nested_code", nc, device);
    check_dtype(op, "nested_code", nc, at::kFloat);
    TORCH_CHECK(nc.dim() == 1 && nc.numel() == 256, op, ": nested_code must have shape [256], got ",
                shape_str(nc.sizes()));
    check_contiguous(op, "nested_code", nc);
    const at::Tensor& off = *offset;
    check_device(op, "offset", off, device);
    check_dtype(op, "offset", off, at::kFloat);
    TORCH_CHECK(off.numel() == 1, op, ": offset must have exactly 1 element, got shape ",
                shape_str(off.sizes()));
  } else {
    TORCH_CHECK(absmax.scalar_type() == at::kFloat, op,
                ": absmax must be uint8 (double quant) or float32 (no double quant), got ",
                absmax.scalar_type());
    TORCH_CHECK(present == 0, op, ": absmax is float32 (no double quant), so nested_absmax, nested_code and "
                "offset must all be None (or empty), got ", present, " of 3");
  }
}

}  // namespace qlora_checks
