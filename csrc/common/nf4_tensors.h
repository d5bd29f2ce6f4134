// Host side of the NF4 weight: the op schemas pass it as one `Tensor?[] w` bundle of exactly six entries,
//   [w_nf4, absmax, code, nested_absmax, nested_code, offset]
// (the last three None or empty without double quant; absmax uint8 <=> double quant). Every wrapper turns the
// bundle into an NF4Tensors once, with NF4Tensors::from_list, which checks it against the weight shape [n, k]
// and builds the NF4View the kernels read. Format: csrc/README.md, "NF4 storage"; twin:
// qlora_ext.reference.check_nf4_storage.
#pragma once

#include <cstdint>
#include <optional>

#include <ATen/core/List.h>
#include <ATen/core/Tensor.h>
#include <c10/util/Exception.h>

#include "common/checks.h"
#include "common/nf4.cuh"

namespace qlora_ext {

using OptionalTensorList = c10::List<std::optional<at::Tensor>>;  // C++ type of a `Tensor?[]` argument

struct NF4Tensors {
  at::Tensor w_nf4;          // uint8 [(n*k+1)/2] (or bnb's [(n*k+1)/2, 1])
  at::Tensor absmax;         // uint8 [nblocks] (double quant) or fp32 [nblocks]
  at::Tensor code;           // fp32 [16]
  at::Tensor nested_absmax;  // fp32 [ceil(nblocks/256)]; undefined without double quant
  at::Tensor nested_code;    // fp32 [256]; undefined without double quant
  at::Tensor offset;         // fp32, one element; undefined without double quant
  int64_t n = 0, k = 0;
  bool double_quant = false;

  // Plain pointers for a kernel's Params.
  NF4View view() const {
    NF4View v{};
    v.w_nf4 = w_nf4.data_ptr<uint8_t>();
    v.code = code.data_ptr<float>();
    if (double_quant) {
      v.absmax_q8 = absmax.data_ptr<uint8_t>();
      v.nested_absmax = nested_absmax.data_ptr<float>();
      v.nested_code = nested_code.data_ptr<float>();
      v.offset = offset.data_ptr<float>();
    } else {
      v.absmax_f32 = absmax.data_ptr<float>();
    }
    return v;
  }

  // Check the bundle `w` for an [n, k] weight on `device` (messages name `op` and the entry) and keep it.
  static NF4Tensors from_list(const char* op, const OptionalTensorList& w, int64_t n, int64_t k,
                              const at::Device& device) {
    TORCH_CHECK(w.size() == 6, op, ": w must be the NF4 storage list [w_nf4, absmax, code, nested_absmax, "
                "nested_code, offset] (6 entries), got ", w.size(), " entries");
    // An optional entry counts as given only when it holds data: the quantize op returns empty [0] tensors for
    // nested_absmax/offset without double quant, and callers may pass those straight back.
    auto entry = [&](size_t i) -> at::Tensor {
      const std::optional<at::Tensor> t = w.get(i);
      return t.has_value() && t->defined() && t->numel() > 0 ? *t : at::Tensor();
    };
    auto required = [&](size_t i, const char* name) -> at::Tensor {
      const std::optional<at::Tensor> t = w.get(i);
      TORCH_CHECK(t.has_value() && t->defined(), op, ": ", name, " (entry ", i, " of w) must be a tensor, got None");
      return *t;
    };

    NF4Tensors t;
    t.n = n;
    t.k = k;
    t.w_nf4 = required(0, "w_nf4");
    t.absmax = required(1, "absmax");
    t.code = required(2, "code");
    t.nested_absmax = entry(3);
    t.nested_code = entry(4);
    t.offset = entry(5);

    TORCH_CHECK(n >= 1 && k >= 1, op, ": weight shape must be positive, got [n, k] = [", n, ", ", k, "]");
    const int64_t numel = n * k;
    const int64_t nbytes = (numel + 1) / 2;
    const int64_t nblocks = ceil_div(numel, kNF4BlockSize);

    check_device(op, "w_nf4", t.w_nf4, device);
    check_dtype(op, "w_nf4", t.w_nf4, at::kByte);
    TORCH_CHECK(t.w_nf4.numel() == nbytes &&
                    (t.w_nf4.dim() == 1 || (t.w_nf4.dim() == 2 && t.w_nf4.size(1) == 1)),
                op, ": w_nf4 must have shape [(n*k+1)//2] = [", nbytes, "] (or [", nbytes, ", 1]) for [n, k] = [",
                n, ", ", k, "], got ", shape_str(t.w_nf4.sizes()));
    check_contiguous(op, "w_nf4", t.w_nf4);

    check_device(op, "code", t.code, device);
    check_dtype(op, "code", t.code, at::kFloat);
    TORCH_CHECK(t.code.dim() == 1 && t.code.numel() == 16, op, ": code must have shape [16], got ",
                shape_str(t.code.sizes()));
    check_contiguous(op, "code", t.code);

    check_device(op, "absmax", t.absmax, device);
    TORCH_CHECK(t.absmax.numel() == nblocks &&
                    (t.absmax.dim() == 1 || (t.absmax.dim() == 2 && t.absmax.size(1) == 1)),
                op, ": absmax must have shape [ceil(n*k/64)] = [", nblocks, "] (the kernels take blocksize 64), got ",
                shape_str(t.absmax.sizes()));
    check_contiguous(op, "absmax", t.absmax);

    t.double_quant = t.absmax.scalar_type() == at::kByte;
    const int present =
        int(t.nested_absmax.defined()) + int(t.nested_code.defined()) + int(t.offset.defined());
    if (t.double_quant) {
      TORCH_CHECK(present == 3, op, ": absmax is uint8 (double quant), so nested_absmax, nested_code and offset "
                  "must all be given, got ", present, " of 3");
      const int64_t nnested = ceil_div(nblocks, kNF4NestedBlockSize);
      check_device(op, "nested_absmax", t.nested_absmax, device);
      check_dtype(op, "nested_absmax", t.nested_absmax, at::kFloat);
      TORCH_CHECK(t.nested_absmax.dim() == 1 && t.nested_absmax.numel() == nnested, op,
                  ": nested_absmax must have shape [ceil(nblocks/256)] = [", nnested, "], got ",
                  shape_str(t.nested_absmax.sizes()));
      check_contiguous(op, "nested_absmax", t.nested_absmax);
      check_device(op, "nested_code", t.nested_code, device);
      check_dtype(op, "nested_code", t.nested_code, at::kFloat);
      TORCH_CHECK(t.nested_code.dim() == 1 && t.nested_code.numel() == 256, op,
                  ": nested_code must have shape [256], got ", shape_str(t.nested_code.sizes()));
      check_contiguous(op, "nested_code", t.nested_code);
      check_device(op, "offset", t.offset, device);
      check_dtype(op, "offset", t.offset, at::kFloat);
      TORCH_CHECK(t.offset.numel() == 1, op, ": offset must have exactly 1 element, got shape ",
                  shape_str(t.offset.sizes()));
    } else {
      TORCH_CHECK(t.absmax.scalar_type() == at::kFloat, op,
                  ": absmax must be uint8 (double quant) or float32 (no double quant), got ",
                  t.absmax.scalar_type());
      TORCH_CHECK(present == 0, op, ": absmax is float32 (no double quant), so nested_absmax, nested_code and "
                  "offset must all be None (or empty), got ", present, " of 3");
    }
    return t;
  }
};

// The argument checks every forward op shares, after check_activation(op, "x", x) and the device guard: lora_A
// [r, k] and lora_B [n, r] in x's dtype on x's device, the kernels' k / r contract, bias [n], the NF4 bundle of
// w [n, k], dropout p. Returns the sizes and the checked storage.
struct ForwardArgs {
  int64_t m, n, k, r;
  bool has_bias;
  NF4Tensors w;
};

inline ForwardArgs check_forward_args(const char* op, const at::Tensor& x, const OptionalTensorList& w,
                                      const at::Tensor& lora_A, const at::Tensor& lora_B,
                                      const std::optional<at::Tensor>& bias, double dropout_p) {
  check_2d(op, "lora_A", lora_A, "[r, k]");
  check_2d(op, "lora_B", lora_B, "[n, r]");
  const int64_t m = x.size(0), k = x.size(1), r = lora_A.size(0), n = lora_B.size(0);
  check_fast_path_sizes(op, k, r);
  check_matrix(op, "lora_A", lora_A, x.scalar_type(), "[r, k]", r, k, x.device());
  check_matrix(op, "lora_B", lora_B, x.scalar_type(), "[n, r]", n, r, x.device());
  const bool has_bias = check_bias(op, bias, n, x.scalar_type(), x.device());
  NF4Tensors storage = NF4Tensors::from_list(op, w, n, k, x.device());
  check_dropout_p(op, dropout_p);
  return {m, n, k, r, has_bias, std::move(storage)};
}

}  // namespace qlora_ext
