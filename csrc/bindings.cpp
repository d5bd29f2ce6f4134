// qlora_ext._C: pybind11 bindings of the CUDA host wrappers (csrc/launchers.h). No TORCH_LIBRARY here: the op
// schemas, fake kernels and autograd live once in qlora_ext/ops.py, which calls these functions.
#include <torch/extension.h>

#include "launchers.h"

PYBIND11_MODULE(TORCH_EXTENSION_NAME, m) {
  m.doc() = "qlora_ext CUDA kernels (fused NF4 QLoRA). The spec of each function is its twin in "
            "qlora_ext/reference.py; call them through the torch.library ops in qlora_ext.ops.";

  m.def("quantize_nf4_cuda", &quantize_nf4_cuda, py::arg("w"), py::arg("blocksize"), py::arg("double_quant"),
        "quantize_nf4_cuda(w, blocksize, double_quant) -> (w_nf4, absmax, nested_absmax, offset).\n"
        "NF4-quantize the flattened w (CUDA, blocksize 64). Without double quant nested_absmax and offset are\n"
        "empty float32 tensors. Bit-exact twin: qlora_ext.reference.quantize_nf4.");

  m.def("dequantize_nf4_cuda", &dequantize_nf4_cuda, py::arg("w_nf4"), py::arg("absmax"), py::arg("code"),
        py::arg("nested_absmax"), py::arg("nested_code"), py::arg("offset"), py::arg("n"), py::arg("k"),
        py::arg("blocksize"), py::arg("dtype"),
        "dequantize_nf4_cuda(w_nf4, absmax, code, nested_absmax, nested_code, offset, n, k, blocksize, dtype)\n"
        "-> w [n, k] in dtype. Bit-exact twin: qlora_ext.reference.dequantize_nf4 (= bnb dequantize_4bit).");

  m.def("qlora_fwd_cuda", &qlora_fwd_cuda, py::arg("x"), py::arg("w_nf4"), py::arg("absmax"), py::arg("code"),
        py::arg("nested_absmax"), py::arg("nested_code"), py::arg("offset"), py::arg("lora_A"),
        py::arg("lora_B"), py::arg("bias"), py::arg("scaling"), py::arg("dropout_p"), py::arg("seed"),
        py::arg("blocksize"),
        "qlora_fwd_cuda(x, w_nf4, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B, bias,\n"
        "scaling, dropout_p, seed, blocksize) -> (y [m, n], u [m, r]).\n"
        "Twin: qlora_ext.reference.qlora_linear.");

  m.def("qlora_bwd_dx_cuda", &qlora_bwd_dx_cuda, py::arg("dy"), py::arg("w_nf4"), py::arg("absmax"),
        py::arg("code"), py::arg("nested_absmax"), py::arg("nested_code"), py::arg("offset"), py::arg("lora_A"),
        py::arg("lora_B"), py::arg("scaling"), py::arg("dropout_p"), py::arg("seed"), py::arg("blocksize"),
        "qlora_bwd_dx_cuda(dy, w_nf4, absmax, code, nested_absmax, nested_code, offset, lora_A, lora_B,\n"
        "scaling, dropout_p, seed, blocksize) -> (dx [m, k], g [m, r]), g = scaling * dy @ lora_B.\n"
        "Twin: the dx output of qlora_ext.reference.qlora_linear_backward.");

  m.def("qlora_bwd_ab_cuda", &qlora_bwd_ab_cuda, py::arg("dy"), py::arg("x"), py::arg("u"), py::arg("g"),
        py::arg("scaling"), py::arg("dropout_p"), py::arg("seed"),
        "qlora_bwd_ab_cuda(dy, x, u, g, scaling, dropout_p, seed) -> (dA [r, k], dB [n, r]),\n"
        "dA = g^T @ dropout(x), dB = scaling * dy^T @ u, one kernel launch.\n"
        "Twin: the dA/dB outputs of qlora_ext.reference.qlora_linear_backward.");
  m.def("lora_dropout_cuda", &lora_dropout_cuda, py::arg("t"), py::arg("dropout_p"), py::arg("seed"),
        "lora_dropout_cuda(t, dropout_p, seed) -> t * mask / (1 - p) with the fused kernels' counter mask\n"
        "(idx = row * k + col). Twin: qlora_ext.reference.dropout.");
  m.def("qlora_gemv_cuda", &qlora_gemv_cuda, py::arg("x"), py::arg("w_nf4"), py::arg("absmax"), py::arg("code"),
        py::arg("nested_absmax"), py::arg("nested_code"), py::arg("offset"), py::arg("lora_A"),
        py::arg("lora_B"), py::arg("bias"), py::arg("scaling"), py::arg("dropout_p"), py::arg("seed"),
        py::arg("blocksize"),
        "qlora_gemv_cuda(...) -> (y [m, n], u [m, r]): split-k decode forward for 1 <= m <= 32, one launch,\n"
        "same arguments as qlora_fwd_cuda. Experimental. Twin: qlora_ext.reference.qlora_linear.");
}
