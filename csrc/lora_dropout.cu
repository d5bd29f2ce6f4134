// LoRA-input dropout as a standalone elementwise kernel, for the decode + cuBLAS path of qlora_ext/ops.py
// (the fused kernels apply the same mask inside their mainloops). out = dropout(t) with the counter mask of
// common/dropout.cuh at idx = row * k + col, so masking x (forward) and g·lora_A (backward) with the same seed
// selects the same elements. Twin: qlora_ext.reference.dropout.
// Memory-bound: reads and writes 2 B/elem; an [8192, 4096] bf16 tensor is 134 MB -> 31 us at 4.27 TB/s.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <cuda_bf16.h>
#include <cuda_fp16.h>

#include "common/checks.h"
#include "common/dropout.cuh"
#include "common/nf4_gemm.cuh"  // Elem<T>: bf16/fp16 <-> fp32 on raw 16-bit patterns (torch builds without half operators)
#include "launchers.h"

namespace {
using qlora::Elem;

constexpr int kThreads = 256;
constexpr int kVec = 8;  // 8 halfs = one 16-byte load/store per thread

struct LoraDropoutParams {
  const void* t;        // [numel] input, contiguous (x dtype)
  void* out;            // [numel] output
  int64_t numel;        // m * k; the flat index is the mask counter idx = row * k + col
  uint32_t dropout_key;
  uint32_t dropout_thresh;
  float inv_keep;       // fp32(1 / (1 - p))
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
    for (int j = 0; j < kVec; ++j)
      v[j] = scale_or_zero<T>(v[j], dropout_keep(p.dropout_key, p.dropout_thresh, uint64_t(i0 + j)), p.inv_keep);
    *reinterpret_cast<uint4*>(out + i0) = raw;
  } else {  // tail of < 8 elements
    for (int64_t i = i0; i < p.numel; ++i)
      out[i] = scale_or_zero<T>(t[i], dropout_keep(p.dropout_key, p.dropout_thresh, uint64_t(i)), p.inv_keep);
  }
}

void launch_lora_dropout(const LoraDropoutParams& p, at::ScalarType dtype) {
  const int64_t blocks = (p.numel + int64_t(kThreads) * kVec - 1) / (int64_t(kThreads) * kVec);
  TORCH_CHECK(blocks <= int64_t(INT32_MAX), "lora_dropout: tensor too large (", p.numel, " elements)");
  const cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  if (dtype == at::kBFloat16) {
    lora_dropout_kernel<__nv_bfloat16><<<unsigned(blocks), kThreads, 0, stream>>>(p);
  } else {
    lora_dropout_kernel<__half><<<unsigned(blocks), kThreads, 0, stream>>>(p);
  }
  C10_CUDA_KERNEL_LAUNCH_CHECK();
}

}  // namespace

at::Tensor lora_dropout_cuda(const at::Tensor& t, double dropout_p, int64_t seed) {
  static constexpr const char* kOp = "lora_dropout";
  qlora_checks::check_half_dtype(kOp, "t", t);
  qlora_checks::check_contiguous(kOp, "t", t);
  TORCH_CHECK(t.dim() == 2, kOp, ": t must be 2-D [m, k], got ", t.dim(), "-D");
  TORCH_CHECK(dropout_p > 0.0 && dropout_p < 1.0, kOp, ": dropout_p must be in (0, 1), got ", dropout_p);
  const c10::cuda::CUDAGuard guard(t.device());
  // A fresh allocation is 16-byte aligned; clone a view whose base is not, so the kernel can use vectors.
  const at::Tensor src = reinterpret_cast<uintptr_t>(t.data_ptr()) % 16 == 0 ? t : t.clone();
  at::Tensor out = at::empty_like(src);
  if (src.numel() == 0) return out;
  LoraDropoutParams p{};
  p.t = src.data_ptr();
  p.out = out.data_ptr();
  p.numel = src.numel();
  p.dropout_key = dropout_key(seed);
  p.dropout_thresh = dropout_threshold(dropout_p);
  p.inv_keep = static_cast<float>(1.0 / (1.0 - dropout_p));
  launch_lora_dropout(p, src.scalar_type());
  return out;
}
