// Element traits on raw 16-bit patterns: the only place bf16 and fp16 differ. Kernels keep activations as
// uint16_t bits (torch builds without the half operators) and convert through these. Every conversion to a
// 16-bit type rounds to nearest even, like torch's .to(bfloat16) / .to(float16).
#pragma once

#include <cstdint>
#include <type_traits>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace qlora_ext {

// T = __nv_bfloat16 or __half. bf16 is the top half of an fp32, so its widening is a shift; fp16 goes through
// the intrinsics.
template <typename T>
struct Elem {
  static constexpr bool kBf16 = std::is_same_v<T, __nv_bfloat16>;
  static_assert(kBf16 || std::is_same_v<T, __half>, "Elem<T>: T is __nv_bfloat16 or __half");
  using T2 = std::conditional_t<kBf16, __nv_bfloat162, __half2>;

  // lo lands in the low 16 bits (= the lower address).
  __device__ __forceinline__ static uint32_t pack2(float lo, float hi) {
    T2 v;
    if constexpr (kBf16) v = __floats2bfloat162_rn(lo, hi);
    else v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ __forceinline__ static float2 unpack2(uint32_t v) {
    if constexpr (kBf16) return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xFFFF0000u));
    else return __half22float2(*reinterpret_cast<__half2*>(&v));
  }
  __device__ __forceinline__ static float to_float(uint16_t v) {
    if constexpr (kBf16) return __uint_as_float(uint32_t(v) << 16);
    else return __half2float(*reinterpret_cast<__half*>(&v));
  }
  __device__ __forceinline__ static uint16_t from_float(float f) {
    T h;
    if constexpr (kBf16) h = __float2bfloat16_rn(f);
    else h = __float2half_rn(f);
    return *reinterpret_cast<uint16_t*>(&h);
  }
};

}  // namespace qlora_ext
