"""Run QLoRALinear calls of chosen cells on one CUDA path, a few times each, for a profiler to attach to (ncu, nsys):
gpu_check.sh's `ncu` stage runs it under Nsight Compute.

    python scripts/kernel_cells.py --path gemv --cells 4096x1024:1 4096x4096:16 --r 16 --mode fwd --calls 3

A cell is KxN:M (in_features k, out_features n, m rows of x), the bench's shape names. Each cell prints one line
(flushed) before its calls, so a profiler report can be matched to it; the first call of a cell is a warm-up that
a profiler can skip (ncu --launch-skip), the rest are identical calls."""
import argparse

import torch

import qlora_ext
from qlora_ext import policy


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--path", required=True, choices=policy.PATHS)
    ap.add_argument("--cells", nargs="+", required=True, help="KxN:M, e.g. 4096x14336:16")
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--mode", choices=("fwd", "fwd+bwd"), default="fwd")
    ap.add_argument("--calls", type=int, default=3, help="calls per cell after the warm-up call")
    ap.add_argument("--dtype", choices=("bfloat16", "float16"), default="bfloat16")
    a = ap.parse_args()
    dtype = getattr(torch, a.dtype)
    torch.manual_seed(0)
    for cell in a.cells:
        shape, m = cell.split(":")
        k, n = (int(v) for v in shape.split("x"))
        layer = qlora_ext.QLoRALinear(qlora_ext.quantize_nf4(torch.randn(n, k, device="cuda", dtype=dtype)),
                                      r=a.r, lora_alpha=2 * a.r, lora_dropout=0.0).cuda()
        layer.lora_B.data.normal_(0, 0.02)
        x = torch.randn(int(m), k, device="cuda", dtype=dtype, requires_grad=a.mode == "fwd+bwd")
        dy = torch.randn(int(m), n, device="cuda", dtype=dtype)
        print(f"kernel_cells: {a.path} {a.mode} k={k} n={n} m={m} r={a.r} {a.dtype}", flush=True)
        with policy.override(a.path):
            for _ in range(1 + a.calls):
                if a.mode == "fwd":
                    with torch.no_grad():
                        layer(x)
                else:
                    layer(x).backward(dy)
        torch.cuda.synchronize()
    print("kernel_cells: done")


if __name__ == "__main__":
    main()
