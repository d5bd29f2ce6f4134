"""GPU timing for bench/: CUDA-event medians with the L2 flushed (triton.testing.do_bench's protocol), host launch
time and peak memory per call (through pytest-benchmark), and the GEMM / copy ceilings of the run."""

from __future__ import annotations

import contextlib
import math
import statistics
import time

from . import _impls

WARMUP_MS, REP_MS, MIN_CALLS = 10.0, 20.0, 3  # warm-up before the first repeat; per repeat: span, fewest timed calls
FLUSH_BYTES = 256 << 20  # triton's L2 flush: zero a 256 MB buffer before every timed call
HOST_BOUND = 0.8  # host launch time >= this fraction of the event-timed median: the host sets the pace
COND_MS, COND_FROM_MS = 40.0, 0.5  # gpu_times: the row's cuBLAS GEMM runs this long before each repeat of a call this long


def do_bench(fn, warmup_ms: float, rep_ms: float, grads=()) -> tuple[list[float], str]:
    """CUDA-event times (ms) of calls of fn, each after an L2 flush and with ``grads``' .grad reset to None:
    triton.testing.do_bench(return_mode="all"), or without triton the same protocol with our own events."""
    try:
        from triton.testing import do_bench as triton_do_bench
    except Exception:  # noqa: BLE001  (triton missing or broken)
        triton_do_bench = None
    if triton_do_bench is not None:
        times = triton_do_bench(fn, warmup=warmup_ms, rep=rep_ms, grad_to_none=list(grads) or None, return_mode="all")
        return [float(t) for t in times], "triton.testing.do_bench"
    import torch

    flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=_impls.DEVICE)
    def pairs(n):
        return [(torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)) for _ in range(n)]

    events = pairs(1)
    fn()
    events[0][0].record()
    for _ in range(5):
        flush.zero_()
        fn()
    events[0][1].record()
    torch.cuda.synchronize()
    est = max(events[0][0].elapsed_time(events[0][1]) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    events = pairs(max(1, int(rep_ms / est)))
    for start, end in events:
        for t in grads:
            t.grad = None
        flush.zero_()
        start.record()
        fn()
        end.record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in events], "cuda events"


def gpu_times(calls, condition=None) -> list:
    """Event-timed medians of a row's calls, measured side by side. calls: (fn, grads, est_ms, context) with
    ``context()`` a context manager that every repeat of fn runs inside (the forced path of a column).

    An H200's clocks follow its power draw with a lag of more than a call: a column timed right after a
    low-power one (the mma.sync kernels) ran faster than the same work timed after the cuBLAS column, by 6 % on
    average and up to 14 % (forced decode_gemm vs the auto column dispatching to it, m >= 8192, 2026-12-01). So
    calls are timed in rounds (three, two for calls over 10 ms), each round one do_bench repeat of every call, the
    order rotated by one per round; and before each repeat of a call of >= COND_FROM_MS, ``condition`` = (fn,
    est_ms), the row's cuBLAS GEMM, runs for COND_MS, so every column starts from the same hot state, the one of a
    training step's back-to-back GEMMs. ``est_ms``, a rough time per call, stretches each repeat to MIN_CALLS timed
    calls. Per call: {median_ms (the median of its repeat medians), spread ((max - min) / median of them), samples,
    repeat_ms, timer}, or the exception it raised (the call then leaves the rounds)."""
    out: list = [[] for _ in calls]
    samples, how = [0] * len(calls), [""] * len(calls)
    for i in range(3):
        for j in [(i + j) % len(calls) for j in range(len(calls))]:
            fn, grads, est_ms, context = calls[j]
            if isinstance(out[j], BaseException) or (i == 2 and est_ms >= 10):
                continue
            try:
                if condition is not None and est_ms >= COND_FROM_MS:
                    for _ in range(math.ceil(COND_MS / max(condition[1], 1e-3))):
                        condition[0]()
                with context():
                    times, how[j] = do_bench(fn, WARMUP_MS if i == 0 else 0.0,
                                             max(REP_MS, MIN_CALLS * (est_ms + 0.1) * 1.25), grads)
            except Exception as e:  # noqa: BLE001  (recorded for this call; the others go on)
                out[j] = e
                continue
            out[j].append(statistics.median(times))
            samples[j] += len(times)
    return [m if isinstance(m, BaseException) else
            {"median_ms": statistics.median(m), "spread": (max(m) - min(m)) / statistics.median(m),
             "samples": samples[j], "repeat_ms": m, "timer": how[j]} for j, m in enumerate(out)]


def graphed(fn):
    """fn captured in a CUDA graph (after a warm-up call on a side stream, which creates cuBLAS handles and
    workspaces outside the capture); returns the replay. Timing the replay measures the GPU work of a call without
    the host launching it: small-m calls are host-bound otherwise."""
    import torch

    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()

    def replay():
        graph.replay()
    replay.graph = graph  # alive as long as the replay
    return replay


def gpu_time(fn, grads=(), est_ms: float = 1.0) -> dict:
    """gpu_times of one call."""
    res = gpu_times([(fn, grads, est_ms, contextlib.nullcontext)])[0]
    if isinstance(res, BaseException):
        raise res
    return res


def rounds(benchmark, target, n: int, setup=None) -> None:
    """benchmark.pedantic(target, rounds=n); with pytest-benchmark disabled (it then calls once) the rest run here."""
    calls = [0]

    def counted():
        calls[0] += 1
        target()

    benchmark.pedantic(counted, setup=setup, rounds=n, iterations=1)
    for _ in range(n - calls[0]):
        setup and setup()
        counted()


def host_and_memory(benchmark, fn, grads, n: int) -> dict:
    """n synchronized calls through pytest-benchmark (its table shows their wall time). Each records the host launch
    time (fn() returning; the GPU is idle when it starts) and the peak memory it allocates beyond what was allocated
    before it."""
    import torch

    host, wall, peak, base = [], [], [], [0]

    def setup():
        for t in grads:
            t.grad = None
        torch.cuda.synchronize()
        base[0] = torch.cuda.memory_allocated()
        torch.cuda.reset_peak_memory_stats()

    def call():
        t0 = time.perf_counter()
        fn()
        host.append((time.perf_counter() - t0) * 1e3)
        torch.cuda.synchronize()
        wall.append((time.perf_counter() - t0) * 1e3)
        peak.append(torch.cuda.max_memory_allocated() - base[0])

    rounds(benchmark, call, n, setup)
    for t in grads:
        t.grad = None
    return {"host_ms": statistics.median(host), "wall_ms": statistics.median(wall), "peak_extra_mib": max(peak) / 2**20}


def ceilings() -> dict:
    """What this GPU reaches: an 8192^3 bf16 GEMM (TFLOP/s) and a 1 GiB device copy (TB/s, read + write)."""
    import torch

    a = torch.randn(8192, 8192, device=_impls.DEVICE, dtype=torch.bfloat16)
    gemm = gpu_time(lambda: a @ a.T, est_ms=2.0)["median_ms"]
    src = torch.empty(2**30, dtype=torch.uint8, device=_impls.DEVICE).random_(0, 255)
    dst = torch.empty_like(src)
    copy = gpu_time(lambda: dst.copy_(src), est_ms=0.5)["median_ms"]
    del a, src, dst
    torch.cuda.empty_cache()
    return {"bf16_gemm_tflops": 2 * 8192**3 / gemm / 1e9, "copy_tb_s": 2 * 2**30 / copy / 1e9, "gemm_ms": gemm,
            "copy_ms": copy}
