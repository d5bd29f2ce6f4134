// LoRA-input dropout as a standalone elementwise kernel, for the decode + cuBLAS path (the fused kernels apply
// the same mask inside their mainloops). out = dropout(t) with the counter mask of common/dropout.cuh at
// idx = row * k + col, so masking x (forward) and g·lora_A (backward) with the same seed selects the same
// elements. Twin: qlora_ext.reference.dropout.
// Memory-bound: reads and writes 2 B/elem; an [8192, 4096] bf16 tensor is 134 MB -> 31 us at 4.27 TB/s.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>
#include <torch/library.h>

#include "common/checks.h"
#include "common/dispatch.h"
#include "common/dropout.cuh"
#include "common/elem.cuh"

namespace qlora_ext {
namespace {

constexpr int kThreads = 256;
constexpr int kVec = 8;  // 8 halfs = one 16-byte load/store per thread

struct LoraDropoutParams {
  const void* t;          // [numel] input, contiguous (x dtype)
  void* out;              // [numel] output
  int64_t numel;          // m * k; the flat index is the mask counter idx = row * k + col
  DropoutParams dropout;
};

// out_dtype(fp32(t) * fp32(1/(1-p))): one fp32 multiply, one rounding, as the reference. +0.0 when dropped.
template <typename T>
__device__ __forceinline__ uint16_t scale_or_zero(uint16_t v, bool keep, float inv_keep) {
  return keep ? Elem<T>::from_float(__fmul_rn(Elem<T>::to_float(v), inv_keep)) : uint16_t(0);
}

template <typename T>
__global__ void __launch_bounds__(kThreads) lora_dropout_kernel(const __grid_constant__ LoraDropoutParams p) {
  const int64_t i0 = (int64_t(blockIdx.x) * kThreads + threadIdx.x) * kVec;
  if (i0 >= p.numel) return;
  const uint16_t* t = static_cast<const uint16_t*>(p.t);  // element bits, converted through Elem<T>
  uint16_t* out = static_cast<uint16_t*>(p.out);
  if (i0 + kVec <= p.numel) {  // body: 16-byte vectors (the host guarantees 16-byte aligned bases)
    uint4 raw = *reinterpret_cast<const uint4*>(t + i0);
    uint16_t* v = reinterpret_cast<uint16_t*>(&raw);
#pragma unroll
    for (int j = 0; j < kVec; ++j) v[j] = scale_or_zero<T>(v[j], p.dropout.keep(uint64_t(i0 + j)), p.dropout.inv_keep);
    *reinterpret_cast<uint4*>(out + i0) = raw;
  } else {  // tail of < 8 elements
    for (int64_t i = i0; i < p.numel; ++i)
      out[i] = scale_or_zero<T>(t[i], p.dropout.keep(uint64_t(i)), p.dropout.inv_keep);
  }
}

// The only launch site of lora_dropout_kernel.
void launch_lora_dropout(const LoraDropoutParams& p, at::ScalarType dtype, cudaStream_t stream) {
  const int64_t blocks = (p.numel + int64_t(kThreads) * kVec - 1) / (int64_t(kThreads) * kVec);
  TORCH_CHECK(blocks <= int64_t(INT32_MAX), "lora_dropout: tensor too large (", p.numel, " elements)");
  dispatch_half(dtype, [&](auto tag) {
    using T = decltype(tag);
    lora_dropout_kernel<T><<<unsigned(blocks), kThreads, 0, stream>>>(p);
  });
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

// Op qlora_ext::_lora_dropout (schema: csrc/ops.cpp) -> dropout(t) [m, k] (t bf16/fp16, 2-D, contiguous,
// 0 < p < 1).
at::Tensor lora_dropout(const at::Tensor& t, double dropout_p, int64_t seed) {
  constexpr const char* kOp = "lora_dropout";
  TORCH_CHECK(t.is_cuda(), kOp, ": t must be a CUDA tensor, got device ", t.device());
  const c10::cuda::CUDAGuard guard(t.device());
  check_half_dtype(kOp, "t", t);
  check_contiguous(kOp, "t", t);
  TORCH_CHECK(t.dim() == 2, kOp, ": t must be 2-D [m, k], got shape ", shape_str(t.sizes()));
  TORCH_CHECK(dropout_p > 0.0 && dropout_p < 1.0, kOp, ": dropout_p must be in (0, 1), got ", dropout_p);
  // A fresh allocation is 16-byte aligned; clone a view whose base is not, so the kernel can use vectors.
  const at::Tensor src = aligned16(t.data_ptr()) ? t : t.clone();
  at::Tensor out = at::empty_like(src);
  if (src.numel() == 0) return out;
  LoraDropoutParams p{};
  p.t = src.data_ptr();
  p.out = out.data_ptr();
  p.numel = src.numel();
  p.dropout = make_dropout(dropout_p, seed);
  launch_lora_dropout(p, src.scalar_type(), c10::cuda::getCurrentCUDAStream());
  return out;
}

}  // namespace
}  // namespace qlora_ext

TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m) { m.impl("_lora_dropout", &qlora_ext::lora_dropout); }
