// NF4 storage view + per-block scale decode, shared by every kernel that reads the frozen weight.
// Format (csrc/README.md, "NF4 storage"): flattened row-major [n, k] weight, element 2j in the HIGH nibble of
// byte j; one absmax per 64-element block; with double quant the absmax is a uint8 code into bnb's signed
// dynamic map, rescaled per 256-block group (nested_absmax) and shifted by a scalar offset.
// Python twin: qlora_ext.reference.dequantize_nf4. Host side (tensor checks, building the view):
// common/nf4_tensors.h.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

namespace qlora_ext {

constexpr int kNF4BlockSize = 64;          // the only blocksize the kernels implement (bnb's default)
constexpr int kNF4NestedBlockSize = 256;   // bnb's double-quant blocksize: nested group = block >> 8
constexpr int kNF4NestedShift = 8;

// Plain pointers into the six storage tensors; trivially copyable so it can live inside any kernel Params.
struct NF4View {
  const uint8_t* w_nf4;          // [(n*k+1)/2] packed nibbles, high nibble = even element
  const uint8_t* absmax_q8;      // [nblocks] uint8 (double quant) or nullptr
  const float* absmax_f32;       // [nblocks] fp32 (no double quant) or nullptr
  const float* code;             // [16] NF4 codebook (bnb quant_map)
  const float* nested_absmax;    // [ceil(nblocks/256)] or nullptr
  const float* nested_code;      // [256] bnb signed dynamic map or nullptr
  const float* offset;           // [1] mean(absmax) or nullptr
};

// IEEE fp32 multiply/add with round-to-nearest-even and subnormals kept, whatever the build flags: PTX
// mul.rn.f32 / add.rn.f32 (no .ftz) are never contracted into an FMA and, unlike __fmul_rn/__fadd_rn, do not
// turn into the .ftz forms under --use_fast_math / -ftz=true. Use nf4_mul_rn for w = fp32(code[nibble] * scale).
__device__ __forceinline__ float nf4_mul_rn(float a, float b) {
  float d;
  asm("mul.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}
__device__ __forceinline__ float nf4_add_rn(float a, float b) {
  float d;
  asm("add.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}
// The quantizer's other exact fp32 ops (PTX sub.rn / rcp.rn / div.rn: IEEE results whatever the flags).
__device__ __forceinline__ float nf4_sub_rn(float a, float b) {
  float d;
  asm("sub.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}
__device__ __forceinline__ float nf4_rcp_rn(float a) {
  float d;
  asm("rcp.rn.f32 %0, %1;" : "=f"(d) : "f"(a));
  return d;
}
__device__ __forceinline__ float nf4_div_rn(float a, float b) {
  float d;
  asm("div.rn.f32 %0, %1, %2;" : "=f"(d) : "f"(a), "f"(b));
  return d;
}

// Scale of block `block` (flattened block index) in bnb's exact rounding order:
//   scale = fp32(fp32(nested_code[q8[b]] * nested_absmax[b >> 8]) + offset)       (double quant)
//   scale = absmax[b]                                                             (no double quant)
// The caller guarantees 0 <= block < nblocks. Branch is uniform per weight (absmax_q8 null or not).
__device__ __forceinline__ float nf4_block_scale(const NF4View& w, int64_t block) {
  if (w.absmax_q8 != nullptr) {
    const float c = __ldg(w.nested_code + __ldg(w.absmax_q8 + block));
    const float na = __ldg(w.nested_absmax + (block >> kNF4NestedShift));
    return nf4_add_rn(nf4_mul_rn(c, na), __ldg(w.offset));
  }
  return __ldg(w.absmax_f32 + block);
}

}  // namespace qlora_ext
