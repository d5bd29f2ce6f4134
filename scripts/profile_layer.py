"""Where the host time of one QLoRALinear call goes: the host wall time per call of the layer's two routes, per CUDA
implementation, and torch.profiler (CPU + CUDA) over forward + backward, printed as the top operators by self CPU
time.

    python scripts/profile_layer.py [--k 4096 --n 4096 --m 2048 --r 16 --dropout 0.0]

The routes: "eager" is the layer's eager CUDA call, one C++ op (torch.ops.qlora_ext._linear) whose backward is a
C++ autograd node; "custom op" is the same layer with eager_fast_path = False, through the torch.library custom op
qlora_linear and its Python autograd (the route of torch.compile, CPU and the reference fallbacks). Both run the
same kernels. The bench flags a cell host-bound when the host work of a call takes about as long as its GPU work;
the difference between the two routes is what the eager route saves per call.
"""
import argparse
import time

import torch
from torch.profiler import ProfilerActivity, profile

import qlora_ext

ROUTES = {"eager": True, "custom op": False}


def host_ms(fn, samples=50):
    """Median host wall time of fn() in ms, with the GPU idle at the start of each call (so no call waits on a full
    launch queue)."""
    times = []
    for _ in range(samples):
        torch.cuda.synchronize()
        t = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t) * 1e3)
    torch.cuda.synchronize()
    times.sort()
    return times[len(times) // 2]


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--k", type=int, default=4096)
    ap.add_argument("--n", type=int, default=4096)
    ap.add_argument("--m", type=int, default=2048)
    ap.add_argument("--r", type=int, default=16)
    ap.add_argument("--dropout", type=float, default=0.0)
    a = ap.parse_args()
    linear = torch.nn.Linear(a.k, a.n, bias=False, device="cuda", dtype=torch.bfloat16)
    layer = qlora_ext.QLoRALinear.from_linear(linear, r=a.r, lora_dropout=a.dropout)
    x = torch.randn(a.m, a.k, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    dy = torch.randn(a.m, a.n, device="cuda", dtype=torch.bfloat16)

    def forward():
        layer(x)

    def step():
        x.grad = layer.lora_A.grad = layer.lora_B.grad = None
        layer(x).backward(dy)

    rows = []
    for path in qlora_ext.policy.PATHS[:2]:  # fused and decode_gemm serve both directions
        with qlora_ext.policy.override(path):
            for route, eager in ROUTES.items():
                layer.eager_fast_path = eager
                for _ in range(5):
                    step()
                rows.append((path, route, host_ms(forward), host_ms(step)))
                with profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
                    for _ in range(5):
                        step()
                    torch.cuda.synchronize()
                print(f"=== {path}, {route}: k={a.k} n={a.n} m={a.m} r={a.r}, 5 fwd+bwd calls")
                print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=25, max_name_column_width=60))
    print(f"host ms per call (median of 50, GPU idle at the start of each): k={a.k} n={a.n} m={a.m} r={a.r}, "
          f"bf16, lora_dropout {a.dropout}")
    print(f"{'path':<12} {'route':<10} {'fwd':>8} {'fwd+bwd':>8}")
    for path, route, fwd_ms, step_ms in rows:
        print(f"{path:<12} {route:<10} {fwd_ms:8.3f} {step_ms:8.3f}")


if __name__ == "__main__":
    main()
