// qlora_ext._C: the internal op schemas of the CUDA kernels, defined once, plus an empty Python module so that
// `from qlora_ext import _C` loads this library (its static initializers register the ops).
//
// The public ops (qlora_ext::qlora_linear, ...) are defined in Python with torch.library.custom_op in the same
// namespace, so this file adds a FRAGMENT. Each kernel file registers its own CUDA implementation at its bottom
// with TORCH_LIBRARY_IMPL(qlora_ext, CUDA, m). The spec of every op is its twin in qlora_ext/reference.py.
//
// `Tensor?[] w` is the NF4 weight bundle, exactly six entries in this order:
//   [w_nf4, absmax, code, nested_absmax, nested_code, offset]
// the last three None (or empty) without double quant; absmax uint8 <=> double quant; blocksize is always 64
// (absmax must have ceil(n*k/64) entries). Checked by NF4Tensors::from_list (common/nf4_tensors.h).
#include <Python.h>

#include <torch/library.h>

extern "C" {
// No methods: importing the module is what matters (the pattern of pytorch/extension-cpp).
PyMODINIT_FUNC PyInit__C(void) {
  static struct PyModuleDef module_def = {
      PyModuleDef_HEAD_INIT,
      "_C",                                                                      // m_name
      "qlora_ext CUDA kernels, registered as torch.ops.qlora_ext._* (csrc/ops.cpp)",  // m_doc
      -1,                                                                        // m_size: global state only
      nullptr,                                                                   // m_methods: none
  };
  return PyModule_Create(&module_def);
}
}

TORCH_LIBRARY_FRAGMENT(qlora_ext, m) {
  // csrc/nf4_quant.cu. NF4-quantize the flattened w (any float dtype, blocksize 64) -> (w_nf4, absmax,
  // nested_absmax, offset); without double quant nested_absmax and offset are empty fp32 tensors.
  // Twin: reference.quantize_nf4 (bit-exact).
  m.def("_quantize_nf4(Tensor w, bool double_quant) -> (Tensor, Tensor, Tensor, Tensor)");
  // csrc/nf4_quant.cu. Decode the whole [n, k] = out.shape weight into out (bf16 / fp16 / fp32, row pitch
  // out.stride(0) >= k, unit column stride). Twin: reference.dequantize_nf4 (bit-exact, = bnb dequantize_4bit).
  m.def("_dequantize_nf4_out(Tensor?[] w, Tensor(a!) out) -> ()");
  // csrc/qlora_fwd.cu. -> (y [m, n], u [m, r]). Twin: reference.qlora_linear.
  m.def("_fused_fwd(Tensor x, Tensor?[] w, Tensor lora_A, Tensor lora_B, Tensor? bias, float scaling, "
        "float dropout_p, int seed) -> (Tensor, Tensor)");
  // csrc/qlora_gemv.cu. Same contract as _fused_fwd for 1 <= m <= 32 (split-k decode kernel). Experimental.
  m.def("_gemv_fwd(Tensor x, Tensor?[] w, Tensor lora_A, Tensor lora_B, Tensor? bias, float scaling, "
        "float dropout_p, int seed) -> (Tensor, Tensor)");
  // csrc/qlora_fwd_sm90.cu. Same contract as _fused_fwd; Hopper (sm_90a) only: NF4 GEMM on CUTLASS's mixed-input
  // wgmma mainloop, LoRA products on cuBLAS. Twin: reference.qlora_linear.
  m.def("_sm90_fwd(Tensor x, Tensor?[] w, Tensor lora_A, Tensor lora_B, Tensor? bias, float scaling, "
        "float dropout_p, int seed) -> (Tensor, Tensor)");
  // csrc/qlora_bwd_dx.cu. -> (dx [m, k], g = scaling·dy·lora_B [m, r]). Twin: dx of
  // reference.qlora_linear_backward.
  m.def("_fused_bwd_dx(Tensor dy, Tensor?[] w, Tensor lora_A, Tensor lora_B, float scaling, float dropout_p, "
        "int seed) -> (Tensor, Tensor)");
  // csrc/qlora_bwd_ab.cu. -> (dA = gᵀ·dropout(x) [r, k], dB = scaling·dyᵀ·u [n, r]), one launch. Twin: dA, dB
  // of reference.qlora_linear_backward.
  m.def("_bwd_ab(Tensor dy, Tensor x, Tensor u, Tensor g, float scaling, float dropout_p, int seed) "
        "-> (Tensor, Tensor)");
  // csrc/lora_dropout.cu. -> t ⊙ mask / (1 - p) with the fused kernels' counter mask (idx = row * k + col),
  // 0 < p < 1. Twin: reference.dropout.
  m.def("_lora_dropout(Tensor t, float dropout_p, int seed) -> Tensor");
  // csrc/qlora_autograd.cpp. The fused path's backward -> (dx [m, k], dA [r, k], dB [n, r]): _fused_bwd_dx, then
  // _bwd_ab. Every path's backward op has this signature (csrc/path_ops.h). Twin: reference.qlora_linear_backward.
  m.def("_fused_bwd(Tensor dy, Tensor x, Tensor u, Tensor?[] w, Tensor lora_A, Tensor lora_B, float scaling, "
        "float dropout_p, int seed) -> (Tensor, Tensor, Tensor)");
  // csrc/decode_gemm.cpp. The decode + cuBLAS path's forward: whole-weight decode into the shared workspace, then
  // cuBLAS; same contract as _fused_fwd. Twin: reference.qlora_linear.
  m.def("_decode_gemm_fwd(Tensor x, Tensor?[] w, Tensor lora_A, Tensor lora_B, Tensor? bias, float scaling, "
        "float dropout_p, int seed) -> (Tensor, Tensor)");
  // csrc/decode_gemm.cpp. Its backward -> (dx, dA, dB), same contract as _fused_bwd. Twin:
  // reference.qlora_linear_backward.
  m.def("_decode_gemm_bwd(Tensor dy, Tensor x, Tensor u, Tensor?[] w, Tensor lora_A, Tensor lora_B, "
        "float scaling, float dropout_p, int seed) -> (Tensor, Tensor, Tensor)");
  // csrc/workspace.cpp. -> bytes held by the paths' shared scratch (all devices, dtypes and streams).
  m.def("_workspace_bytes() -> int");
  // csrc/workspace.cpp. Drop the shared scratch buffers (the next call that needs one allocates it again).
  m.def("_release_workspace() -> ()");
  // csrc/qlora_autograd.cpp. The GEMM path names in path-id order; must equal qlora_ext.policy.PATHS.
  m.def("_path_names() -> str[]");
  // csrc/qlora_autograd.cpp. QLoRALinear's eager CUDA call -> y [m, n], with a C++ autograd node: forward by the
  // forward op of path fwd_path, backward by the backward op of bwd_path (indices into _path_names()). Twin:
  // reference.qlora_linear (y) and reference.qlora_linear_backward (gradients).
  m.def("_linear(Tensor x, Tensor?[] w, Tensor lora_A, Tensor lora_B, Tensor? bias, float scaling, "
        "float dropout_p, int seed, int fwd_path, int bwd_path) -> Tensor");
}
