"""Drive every CUDA kernel once on small shapes, for compute-sanitizer (memcheck, racecheck, initcheck).

Shapes are chosen to hit the edge paths: m and n tails that are not tile multiples, r not a multiple of 16,
dropout on, bias on, both activation dtypes, double quant on and off, and both CUDA implementations of the GEMM
ops (every entry of qlora_ext.policy.PATHS)."""
import itertools
import os

import torch

import qlora_ext

ops = torch.ops.qlora_ext
assert qlora_ext.has_cuda_kernels(), "built without CUDA kernels"
seed = torch.tensor(7, dtype=torch.int64)
# (m, k, n, r). (5, 1024, 100, 24): k split across CTAs on the small-m path (fewer row tiles than SMs, k > 256);
# (3, 256, 1000, 16): n split across CTAs in the fused dx kernel (2 dx tiles, 16 n-steps); the last two: n % 16 == 0
# and n % 16 == 8, the shapes the sm90 path serves (repacked and stored weight layouts).
SHAPES = ((1, 64, 33, 3), (37, 192, 130, 16), (130, 128, 257, 40), (5, 1024, 100, 24), (3, 256, 1000, 16),
          (70, 256, 192, 16), (9, 128, 136, 8))
for path, dtype, double_quant, (m, k, n, r) in itertools.product(
        qlora_ext.policy.PATHS, (torch.bfloat16, torch.float16), (True, False), SHAPES):
    os.environ["QLORA_EXT_PATH"] = path
    wq = qlora_ext.quantize_nf4(torch.randn(n, k, device="cuda", dtype=dtype), double_quant=double_quant)
    wq.dequantize(dtype)
    x = torch.randn(m, k, device="cuda", dtype=dtype)
    lora_A = torch.randn(r, k, device="cuda", dtype=dtype) * 0.05
    lora_B = torch.randn(n, r, device="cuda", dtype=dtype) * 0.05
    bias = torch.randn(n, device="cuda", dtype=dtype)
    y, u = ops.qlora_linear(x, *wq.op_args(), lora_A, lora_B, bias, 2.0, 0.1, seed, 64)
    dy = torch.randn_like(y)
    dx, dA, dB = ops.qlora_linear_backward(dy, x, u, *wq.op_args(), lora_A, lora_B, 2.0, 0.1, seed, 64)
    torch.cuda.synchronize()
    assert all(torch.isfinite(t).all() for t in (y, u, dx, dA, dB)), (path, dtype, double_quant, m, k, n, r)
print("sanitize_kernels: all kernels ran")

