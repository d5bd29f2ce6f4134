// NF4 storage view + per-block scale decode, shared by every kernel that reads the frozen weight.
// Format (contract §"NF4 storage tensors", ARCHITECTURE §2): flattened row-major [n,k] weight, element 2j in
// the HIGH nibble of byte j; one absmax per 64-element block; with double quant the absmax is a uint8 code into
// bnb's signed dynamic map, rescaled per 256-block group (nested_absmax) and shifted by a scalar offset.
// Python twin: qlora_ext.reference.dequantize_nf4.
#pragma once

#include <cstdint>
#include <cuda_runtime.h>

#if !defined(__CUDACC_RTC__)
#include <optional>
#include <ATen/core/Tensor.h>
#endif

// Global namespace on purpose: kernels in other files use these names unqualified (contract signatures).
namespace nf4 {
constexpr int kBlockSize = 64;           // fast paths require bnb's default blocksize
constexpr int kNestedBlockSize = 256;    // bnb's double-quant blocksize: nested group = block >> 8
constexpr int kNestedShift = 8;
}  // namespace nf4

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
    const float na = __ldg(w.nested_absmax + (block >> nf4::kNestedShift));
    return nf4_add_rn(nf4_mul_rn(c, na), __ldg(w.offset));
  }
  return __ldg(w.absmax_f32 + block);
}

#if !defined(__CUDACC_RTC__)
// Host: build the view from the op's tensors. Callers run check_nf4_weight (checks.h) first; this only reads
// data pointers. Double quant <=> absmax is uint8 (then nested_* and offset must be present).
inline NF4View make_nf4_view(const at::Tensor& w_nf4, const at::Tensor& absmax, const at::Tensor& code,
                             const std::optional<at::Tensor>& nested_absmax,
                             const std::optional<at::Tensor>& nested_code,
                             const std::optional<at::Tensor>& offset) {
  NF4View v{};
  v.w_nf4 = w_nf4.data_ptr<uint8_t>();
  v.code = code.data_ptr<float>();
  if (absmax.scalar_type() == at::kByte) {
    v.absmax_q8 = absmax.data_ptr<uint8_t>();
    v.absmax_f32 = nullptr;
    v.nested_absmax = nested_absmax.value().data_ptr<float>();
    v.nested_code = nested_code.value().data_ptr<float>();
    v.offset = offset.value().data_ptr<float>();
  } else {
    v.absmax_q8 = nullptr;
    v.absmax_f32 = absmax.data_ptr<float>();
    v.nested_absmax = nullptr;
    v.nested_code = nullptr;
    v.offset = nullptr;
  }
  return v;
}
#endif
