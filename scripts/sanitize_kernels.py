"""Drive every CUDA kernel once on small shapes, for compute-sanitizer (memcheck, racecheck, initcheck).

Shapes are chosen to hit the edge paths: m and n tails that are not tile multiples, r not a multiple of 16,
dropout on, bias on, both activation dtypes, double quant on and off."""
import torch

import qlora_ext

ops = torch.ops.qlora_ext
assert qlora_ext.has_cuda_kernels(), "built without CUDA kernels"
seed = torch.tensor(7, dtype=torch.int64)
for dtype in (torch.bfloat16, torch.float16):
    for double_quant in (True, False):
        for (m, k, n, r) in ((1, 64, 33, 3), (37, 192, 130, 16), (130, 128, 257, 40)):
            w = torch.randn(n, k, device="cuda", dtype=dtype)
            wq = qlora_ext.quantize_nf4(w, double_quant=double_quant)
            wq.dequantize(dtype)
            x = torch.randn(m, k, device="cuda", dtype=dtype)
            lora_A = torch.randn(r, k, device="cuda", dtype=dtype) * 0.05
            lora_B = torch.randn(n, r, device="cuda", dtype=dtype) * 0.05
            bias = torch.randn(n, device="cuda", dtype=dtype)
            y, u = ops.qlora_linear(x, *wq.op_args(), lora_A, lora_B, bias, 2.0, 0.1, seed, 64)
            dy = torch.randn_like(y)
            dx, dA, dB = ops.qlora_linear_backward(dy, x, u, *wq.op_args(), lora_A, lora_B, 2.0, 0.1, seed, 64)
            torch.cuda.synchronize()
            assert all(torch.isfinite(t).all() for t in (y, u, dx, dA, dB))
print("sanitize_kernels: all kernels ran")
