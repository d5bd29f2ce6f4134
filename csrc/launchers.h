// Host wrappers of the CUDA kernels: the whole C++ surface of qlora_ext._C (bound in bindings.cpp, called by
// qlora_ext/ops.py, which owns the torch.library schemas). Each wrapper: device guard -> checks -> allocate ->
// Params -> its file's single launcher. Twins (the spec) live in qlora_ext/reference.py.
#pragma once

#include <cstdint>
#include <optional>
#include <tuple>

#include <ATen/core/Tensor.h>

// csrc/nf4_quant.cu ------------------------------------------------------------------------------------------
// w: any float dtype, any shape (flattened row-major), contiguous, CUDA; blocksize must be 64.
// -> (w_nf4 uint8 [(numel+1)/2], absmax uint8 [nblocks] | fp32 [nblocks], nested_absmax fp32 [ceil(nblocks/256)]
//     | empty [0], offset fp32 0-d | empty [0]).   Twin: reference.quantize_nf4.
std::tuple<at::Tensor, at::Tensor, at::Tensor, at::Tensor> quantize_nf4_cuda(const at::Tensor& w,
                                                                             int64_t blocksize,
                                                                             bool double_quant);

// -> w [n, k] in dtype (bf16 / fp16 / fp32), bit-exact with bnb's dequantize_4bit. Twin: reference.dequantize_nf4.
at::Tensor dequantize_nf4_cuda(const at::Tensor& w_nf4, const at::Tensor& absmax, const at::Tensor& code,
                               const std::optional<at::Tensor>& nested_absmax,
                               const std::optional<at::Tensor>& nested_code,
                               const std::optional<at::Tensor>& offset, int64_t n, int64_t k, int64_t blocksize,
                               at::ScalarType dtype);

// csrc/qlora_fwd.cu ------------------------------------------------------------------------------------------
// -> (y [m, n], u [m, r]) in x's dtype. Twin: reference.qlora_linear.
std::tuple<at::Tensor, at::Tensor> qlora_fwd_cuda(const at::Tensor& x, const at::Tensor& w_nf4,
                                                  const at::Tensor& absmax, const at::Tensor& code,
                                                  const std::optional<at::Tensor>& nested_absmax,
                                                  const std::optional<at::Tensor>& nested_code,
                                                  const std::optional<at::Tensor>& offset,
                                                  const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                  const std::optional<at::Tensor>& bias, double scaling,
                                                  double dropout_p, int64_t seed, int64_t blocksize);

// csrc/qlora_bwd_dx.cu ---------------------------------------------------------------------------------------
// -> (dx [m, k], g = s·dy·lora_B [m, r]) in dy's dtype. Twin: the dx part of reference.qlora_linear_backward.
std::tuple<at::Tensor, at::Tensor> qlora_bwd_dx_cuda(const at::Tensor& dy, const at::Tensor& w_nf4,
                                                     const at::Tensor& absmax, const at::Tensor& code,
                                                     const std::optional<at::Tensor>& nested_absmax,
                                                     const std::optional<at::Tensor>& nested_code,
                                                     const std::optional<at::Tensor>& offset,
                                                     const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                     double scaling, double dropout_p, int64_t seed,
                                                     int64_t blocksize);

// csrc/qlora_bwd_ab.cu ---------------------------------------------------------------------------------------
// -> (dA = gᵀ·dropout(x) [r, k], dB = s·dyᵀ·u [n, r]) in x's dtype, one launch.
// Twin: the dA/dB part of reference.qlora_linear_backward.
std::tuple<at::Tensor, at::Tensor> qlora_bwd_ab_cuda(const at::Tensor& dy, const at::Tensor& x,
                                                     const at::Tensor& u, const at::Tensor& g, double scaling,
                                                     double dropout_p, int64_t seed);

// csrc/lora_dropout.cu ---------------------------------------------------------------------------------------
// -> dropout(t) [m, k] (t bf16/fp16, contiguous, 0 < p < 1): the fused kernels' mask at idx = row*k + col,
// scaled by fp32(1/(1-p)). Used by the decode + cuBLAS path. Twin: reference.dropout.
at::Tensor lora_dropout_cuda(const at::Tensor& t, double dropout_p, int64_t seed);

// csrc/qlora_gemv.cu -----------------------------------------------------------------------------------------
// Small-m decode forward, 1 <= m <= 32, one launch: -> (y [m, n], u [m, r]) like qlora_fwd_cuda.
// Experimental (QLORA_EXT_PATH=gemv): compiled and tested in tests/test_cuda.py, not yet run on a GPU.
// Twin: reference.qlora_linear.
std::tuple<at::Tensor, at::Tensor> qlora_gemv_cuda(const at::Tensor& x, const at::Tensor& w_nf4,
                                                   const at::Tensor& absmax, const at::Tensor& code,
                                                   const std::optional<at::Tensor>& nested_absmax,
                                                   const std::optional<at::Tensor>& nested_code,
                                                   const std::optional<at::Tensor>& offset,
                                                   const at::Tensor& lora_A, const at::Tensor& lora_B,
                                                   const std::optional<at::Tensor>& bias, double scaling,
                                                   double dropout_p, int64_t seed, int64_t blocksize);
