// Element traits on raw 16-bit patterns: the only place bf16 and fp16 differ. Kernels keep activations as
// uint16_t bits (torch builds without the half operators) and convert through these. Every conversion to a
// 16-bit type rounds to nearest even, like torch's .to(bfloat16) / .to(float16).
#pragma once

#include <cstdint>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

namespace qlora_ext {

template <typename T>
struct Elem;

template <>
struct Elem<__nv_bfloat16> {
  // lo lands in the low 16 bits (= the lower address).
  __device__ __forceinline__ static uint32_t pack2(float lo, float hi) {
    __nv_bfloat162 v = __floats2bfloat162_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ __forceinline__ static float2 unpack2(uint32_t v) {
    return make_float2(__uint_as_float(v << 16), __uint_as_float(v & 0xFFFF0000u));
  }
  __device__ __forceinline__ static float to_float(uint16_t v) { return __uint_as_float(uint32_t(v) << 16); }
  __device__ __forceinline__ static uint16_t from_float(float f) {
    __nv_bfloat16 h = __float2bfloat16_rn(f);
    return *reinterpret_cast<uint16_t*>(&h);
  }
};

template <>
struct Elem<__half> {
  __device__ __forceinline__ static uint32_t pack2(float lo, float hi) {
    __half2 v = __floats2half2_rn(lo, hi);
    return *reinterpret_cast<uint32_t*>(&v);
  }
  __device__ __forceinline__ static float2 unpack2(uint32_t v) {
    return __half22float2(*reinterpret_cast<__half2*>(&v));
  }
  __device__ __forceinline__ static float to_float(uint16_t v) {
    return __half2float(*reinterpret_cast<__half*>(&v));
  }
  __device__ __forceinline__ static uint16_t from_float(float f) {
    __half h = __float2half_rn(f);
    return *reinterpret_cast<uint16_t*>(&h);
  }
};

}  // namespace qlora_ext
