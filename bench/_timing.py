"""GPU timing for bench/: CUDA-event medians with the L2 flushed (triton.testing.do_bench's protocol), host launch
time and peak memory per call (through pytest-benchmark), and the GEMM / copy ceilings of the run."""

from __future__ import annotations

import math
import statistics
import time

from . import _impls

WARMUP_MS, REP_MS = 10.0, 20.0  # gpu_time (a single call, do_bench): warm-up, then the timed span
FLUSH_BYTES = 256 << 20  # triton's L2 flush: zero a 256 MB buffer before every timed call
HOST_BOUND = 0.8  # host launch time >= this fraction of the event-timed median: the host sets the pace
WARMUP_ROUNDS, ROUNDS_MIN, ROUNDS_MAX, ROW_MS = 2, 9, 60, 60.0  # gpu_times: the rounds of a row (see there)
LEAD_IN_MAX_MS = 5.0  # gpu_times: calls estimated longer than this skip the lead-in call (_Clock.time says why)


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


class _Clock:
    """The measurement under gpu_times: CUDA events around one call, after an untimed lead-in call of the same fn,
    its ``grads``' .grad reset to None and a FLUSH_BYTES L2 flush (triton.testing.do_bench's per-call protocol).
    bench/test_timing.py swaps in a fake to check the rounds on the CPU."""

    def __init__(self):
        import torch

        self.torch = torch
        self.flush = torch.empty(FLUSH_BYTES, dtype=torch.int8, device=_impls.DEVICE)

    def time(self, fn, grads, context, lead_in=True):
        with context():
            # A lead-in call first: while the GPU runs it, the host launches the timed call, as in a training step's
            # back-to-back layers. So a GPU-bound call measures its GPU time, a host-bound one its host pace, and
            # neither depends on what the previous column left in the queue. A long call needs none: its first
            # launch hides behind the flush and the rest behind its own kernels.
            if lead_in:
                for t in grads:
                    t.grad = None
                fn()
            for t in grads:
                t.grad = None
            self.flush.zero_()
            start, end = (self.torch.cuda.Event(enable_timing=True) for _ in range(2))
            start.record()
            fn()
            end.record()
        return start, end

    def read(self, handles: list) -> list[float]:
        self.torch.cuda.synchronize()
        return [start.elapsed_time(end) for start, end in handles]


def williams_order(n: int, i: int) -> list[int]:
    """Round i of a Williams design for n items: a Latin square in which every item follows every other exactly once
    over n rounds (n even) or 2n rounds (n odd: the second n rounds are the first n reversed)."""
    base, lo, hi = [0], 1, n - 1
    while len(base) < n:  # 0, 1, n-1, 2, n-2, ...
        base.append(lo)
        lo += 1
        if len(base) < n:
            base.append(hi)
            hi -= 1
    order = [(b + i) % n for b in base]
    return order[::-1] if n % 2 and (i // n) % 2 else order


def gpu_times(calls) -> list:
    """Event-timed medians of a row's calls, measured interleaved. calls: (fn, grads, est_ms, context) with
    ``context()`` a context manager that each call of fn runs inside (the forced path of a column); ``est_ms``, a
    rough time per call, sets the number of rounds.

    Why interleaved: an H200's clocks follow its power draw with a lag of more than a call, so a call inherits the state
    its predecessor left. Timed in blocks per column (even with the row's cuBLAS GEMM run for 40 ms before every block),
    the auto column and the forced decode_gemm column, the same kernels, came out 3-6 % apart at m >= 8192 (2026-12-01:
    12.05 vs 11.68 ms for 28672→8192, m = 16384); interleaved with the order merely rotated (so each column always
    followed the same one) still 5-11 %: the column after cuBLAS slow, the one after the low-power mma.sync column fast.
    So each round times every column once in the order of a Williams design (williams_order): over one period every
    column follows every other exactly once, and the carry-over averages out. Each timed call up to LEAD_IN_MAX_MS
    follows an untimed call of its own column (_Clock.time says why). Two untimed rounds warm up; then about ROW_MS of
    the row's calls, ROUNDS_MIN..ROUNDS_MAX rounds, in whole periods of the design.
    Per call: {median_ms (median of all its samples), repeat_ms (the medians of the first, second and last third of
    the rounds), spread ((max - min) / median of those), samples, timer}, or the exception it raised (the call then
    leaves the rounds)."""
    clock = _Clock()
    out: list = [[] for _ in calls]
    total = sum(max(c[2], 1e-3) for c in calls)
    want = min(ROUNDS_MAX, max(ROUNDS_MIN, math.ceil(ROW_MS / total)))
    period = len(calls) if len(calls) % 2 == 0 else 2 * len(calls)
    n = period * max(1, round(want / period))
    for i in range(WARMUP_ROUNDS + n):
        order = williams_order(len(calls), (i - WARMUP_ROUNDS) % period)
        handles = []
        for j in order:
            if isinstance(out[j], BaseException):
                continue
            fn, grads, est_ms, context = calls[j]
            try:
                handles.append((j, clock.time(fn, grads, context, lead_in=est_ms <= LEAD_IN_MAX_MS)))
            except Exception as e:  # noqa: BLE001  (recorded for this call; the others go on)
                out[j] = e
        try:
            times = clock.read([h for _, h in handles])
        except Exception as e:  # noqa: BLE001  (an asynchronous error: which call is unknown, all are void)
            return [e] * len(calls)
        if i >= WARMUP_ROUNDS:
            for (j, _), t in zip(handles, times):
                if not isinstance(out[j], BaseException):
                    out[j].append(t)
    res = []
    for m in out:
        if isinstance(m, BaseException):
            res.append(m)
            continue
        thirds = [statistics.median(m[a * len(m) // 3:(a + 1) * len(m) // 3]) for a in range(3)]
        res.append({"median_ms": statistics.median(m), "spread": (max(thirds) - min(thirds)) / statistics.median(m),
                    "samples": len(m), "repeat_ms": thirds, "timer": "interleaved CUDA events"})
    return res


def graphed(fn, grads=()):
    """fn captured in a CUDA graph (after a warm-up call on a side stream, which creates cuBLAS handles and
    workspaces outside the capture); returns the replay. Timing the replay measures the GPU work of a call without
    the host launching it: small-m calls are host-bound otherwise. ``grads``' .grad are reset before the warm-up and
    the capture, so a captured backward writes fresh gradients (graph-pool memory) instead of accumulating."""
    import torch

    for t in grads:
        t.grad = None
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):
        fn()
    torch.cuda.current_stream().wait_stream(side)
    for t in grads:
        t.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()

    def replay():
        graph.replay()
    replay.graph = graph  # alive as long as the replay
    return replay


def gpu_time(fn, grads=()) -> dict:
    """The median CUDA-event time of fn (do_bench: WARMUP_MS of warm-up, REP_MS of timed calls)."""
    times, timer = do_bench(fn, WARMUP_MS, REP_MS, grads)
    return {"median_ms": statistics.median(times), "samples": len(times), "timer": timer}


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
    gemm = gpu_time(lambda: a @ a.T)["median_ms"]
    src = torch.empty(2**30, dtype=torch.uint8, device=_impls.DEVICE).random_(0, 255)
    dst = torch.empty_like(src)
    copy = gpu_time(lambda: dst.copy_(src))["median_ms"]
    del a, src, dst
    torch.cuda.empty_cache()
    return {"bf16_gemm_tflops": 2 * 8192**3 / gemm / 1e9, "copy_tb_s": 2 * 2**30 / copy / 1e9, "gemm_ms": gemm,
            "copy_ms": copy}
