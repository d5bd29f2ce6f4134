"""Where the host time of one QLoRALinear call goes: torch.profiler (CPU + CUDA) over forward + backward of one
layer, per CUDA implementation, printed as the top operators by self CPU time and the host wall time per call.

    python scripts/profile_layer.py [--k 4096 --n 4096 --m 2048 --r 16]

The bench flags a cell host-bound when the Python/dispatch work of a call takes about as long as its GPU work;
this shows which part of that work is ours (op dispatch, the backend, autograd) and which is PyTorch's.
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import qlora_ext


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--r", type=int, default=16)
    a = ap.parse_args()
    linear = torch.nn.Linear(a.k, a.n, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = qlora_ext.QLoRALinear.from_linear(linear, r=a.r)
    x = torch.randn(a.m, a.k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(a.m, a.n, device="cuda", dtype=torch.bfloat16)

    def step():
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None
        layer(x).backward(dy)

    for path in qlora_ext.policy.PATHS[:2]:  # fused and decode_gemm serve both directions
        with qlora_ext.policy.override(path):
            for _ in range(5):
                step()
            samples = []
            for _ in range(20):  # host time per call with the GPU idle at the start of each
                torch.cuda.synchronize()
                t = time.perf_counter()
                step()
                samples.append((time.perf_counter() - t) * 1e3)
            torch.cuda.synchronize()
            with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                for _ in range(5):
                    step()
                torch.cuda.synchronize()
            samples.sort()
            print(f"=== {path}: k={a.k} n={a.n} m={a.m} r={a.r}: host ms per fwd+bwd call (median of 20, GPU idle at "
                  f"start) {samples[len(samples) // 2]:.3f}")
            print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))


if __name__ == "__main__":
    main()
