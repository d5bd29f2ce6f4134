// Host-side compile-time dispatch shared by the launchers: runtime facts -> template arguments, at most two
// levels (dtype, then rank bucket).
#pragma once

#include <cstdint>
#include <type_traits>

#include <c10/core/ScalarType.h>
#include <c10/util/Exception.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace qlora_ext {

// Rank bucket: u / g and the LoRA tiles are padded with zeros to kRPad columns. Four buckets keep the
// padded MMA work within 2x of r while the instantiation count stays small (2 dtypes x 4 ranks).
// f receives std::integral_constant<int, kRPad>; callers have checked 1 <= r <= 128.
template <typename F>
void dispatch_rank(int64_t r, F&& f) {
  if (r <= 16) f(std::integral_constant<int, 16>{});
  else if (r <= 32) f(std::integral_constant<int, 32>{});
  else if (r <= 64) f(std::integral_constant<int, 64>{});
  else f(std::integral_constant<int, 128>{});
}

// bf16 or fp16 activations: f receives a value of the CUDA element type (__nv_bfloat16 or __half) as a tag.
// Callers have checked the dtype is one of the two.
template <typename F>
void dispatch_half(at::ScalarType dtype, F&& f) {
  if (dtype == at::kBFloat16) f(__nv_bfloat16{});
  else f(__half{});
}

// Any float storage type (fp32, fp16, bf16; the NF4 quantize input and dequantize output): f receives a value of
// the element type as a tag; any other dtype raises, naming `what` (e.g. "quantize_nf4: w").
template <typename F>
void dispatch_float(at::ScalarType dtype, const char* what, F&& f) {
  switch (dtype) {
    case at::kFloat: f(float{}); break;
    case at::kHalf: f(__half{}); break;
    case at::kBFloat16: f(__nv_bfloat16{}); break;
    default: TORCH_CHECK(false, what, " must be float32, float16 or bfloat16, got ", dtype);
  }
}

}  // namespace qlora_ext
