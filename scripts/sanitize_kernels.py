"""Drive every CUDA kernel once on small shapes, for compute-sanitizer (memcheck, racecheck, initcheck).

Shapes are chosen to hit the edge paths: m and n tails that are not tile multiples, r not a multiple of 16,
dropout on, bias on, both activation dtypes, double quant on and off, and both CUDA implementations of the GEMM
ops (every entry of qlora_ext.policy.PATHS).

Each configuration prints a line (flushed) before it runs and synchronizes after, so a sanitizer report lands under
the line of the configuration that caused it, and the address ranges of the outputs whose last writer is a cuBLAS
call of the path that ran (CUBLAS_WRITTEN): compute-sanitizer's initcheck does not see some of cuBLAS's stores on
an H200, so reads of those tensors are reported although cuBLAS wrote them. scripts/initcheck_gate.py sorts the
reports by these ranges. --cublas-control runs no code of ours: for each shape, u = x·lora_Aᵀ on cuBLAS
(torch.mm, the call the paths make) read back by a torch kernel, the control that shows the tool's blind spot."""
import argparse
import itertools
import os
import sys

import torch

import qlora_ext

ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
ap.add_argument("--cublas-control", action="store_true", help="only the cuBLAS product + torch read of each shape")
args = ap.parse_args()
ops = torch.ops.qlora_ext
seed = torch.tensor(7, dtype=torch.int64)
# (m, k, n, r). (5, 1024, 100, 24): k split across CTAs on the small-m path (fewer row tiles than SMs, k > 256);
# (3, 256, 1000, 16): n split across CTAs in the fused dx kernel (2 dx tiles, 16 n-steps); the last two: n % 16 == 0
# and n % 16 == 8, the shapes the sm90 path serves (repacked and stored weight layouts).
SHAPES = ((1, 64, 33, 3), (37, 192, 130, 16), (130, 128, 257, 40), (5, 1024, 100, 24), (3, 256, 1000, 16),
          (70, 256, 192, 16), (9, 128, 136, 8))
if args.cublas_control:
    for dtype, (m, k, n, r) in itertools.product((torch.bfloat16, torch.float16), SHAPES):
        print(f"sanitize_kernels: cublas control {dtype} m={m} k={k} r={r}", flush=True)
        x = torch.randn(m, k, device="cuda", dtype=dtype)
        lora_A = torch.randn(r, k, device="cuda", dtype=dtype)
        u = torch.mm(x, lora_A.t())
        assert torch.isfinite(u.float() * 2).all()
        torch.cuda.synchronize()
    print("sanitize_kernels: cublas control ran")
    sys.exit(0)
assert qlora_ext.has_cuda_kernels(), "built without CUDA kernels"
# Outputs whose last writer is cuBLAS, per path (csrc/decode_gemm.cpp: y = x·wᵀ then addmm, dx = mm then addmm;
# the gemv and sm90 forwards: u = at::mm; the fused kernels write everything themselves). Forward, then backward.
CUBLAS_WRITTEN = {"decode_gemm": (("y", "u"), ("dx",)), "gemv": (("u",), ()), "sm90": (("u",), ()),
                  "fused": ((), ())}
for path, dtype, double_quant, (m, k, n, r) in itertools.product(
        qlora_ext.policy.PATHS, (torch.bfloat16, torch.float16), (True, False), SHAPES):
    print(f"sanitize_kernels: config {path} {dtype} double_quant={double_quant} m={m} k={k} n={n} r={r}", flush=True)
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
    out = {"y": y, "u": u, "dx": dx}
    ran = [qlora_ext.policy.choose(x.device, dtype, m, n, k, fwd) for fwd in (True, False)]
    for names in (CUBLAS_WRITTEN[ran[0]][0], CUBLAS_WRITTEN[ran[1]][1]):
        for name in names:
            t = out[name]
            print(f"sanitize_kernels: cublas-written {name} {t.data_ptr():#x} {t.data_ptr() + t.nbytes:#x}", flush=True)
    assert all(torch.isfinite(t).all() for t in (y, u, dx, dA, dB)), (path, dtype, double_quant, m, k, n, r)
print("sanitize_kernels: all kernels ran")

