"""Timing for the bench suite: GPU time from CUDA events, and how it reaches pytest-benchmark.

Layer cells are timed with ``triton.testing.do_bench`` -- the protocol the anchors were measured with: one
call, a 5-call estimate, warm-up for ``warmup_ms``, then timed calls for ``rep_ms``, each preceded by zeroing a
256 MB buffer (flushes the 50 MB L2, so every call reads its weights from DRAM as in a real model) and bracketed
by CUDA events. Gradients named in ``grad_to_none`` are reset before each timed call so backward never adds an
accumulation kernel. Without triton, ``_event_bench`` below runs the same protocol.

A CUDA event pair measures the stream's time between two points, so a call that is bound by host-side launch
work (PEFT's Python at small m) is measured as the user pays it, and a call bound by GPU work as GPU time.

pytest-benchmark's own timer is a host clock around a Python call, which would only see launch time. So each
test is marked ``@pytest.mark.benchmark(timer=gpu_time_clock)`` and, after measuring, replays its event samples
through ``benchmark.pedantic``: every round advances this clock by one measured sample, so the pytest-benchmark
table's min / median / mean / IQR are statistics of the CUDA-event samples, one round per timed call.
"""

from __future__ import annotations

import dataclasses
import statistics
import time
from collections.abc import Callable, Sequence

_NOW = [0.0]  # seconds of replayed GPU time; only ever advanced
DEVICE = "cuda"  # where the suite allocates; the self-test's dry run points it at the CPU with torch.cuda faked


def gpu_time_clock() -> float:
    """pytest-benchmark timer: the sum of the GPU-time samples replayed so far (see module docstring)."""
    return _NOW[0]


def feed_benchmark(benchmark, samples_ms: Sequence[float], extra_info: dict | None = None) -> None:
    """Record ``samples_ms`` (CUDA-event times) as the rounds of a pytest-benchmark fixture."""
    if extra_info:
        benchmark.extra_info.update(extra_info)
    # The marker sets the timer; older fixtures that ignore marker timers get it set directly.
    if getattr(benchmark, "_timer", gpu_time_clock) is not gpu_time_clock:
        benchmark._timer = gpu_time_clock
    samples = list(samples_ms)
    it = iter(samples)

    def one_sample():
        _NOW[0] += next(it) * 1e-3

    benchmark.pedantic(one_sample, rounds=len(samples), iterations=1, warmup_rounds=0)


@dataclasses.dataclass
class Timing:
    samples_ms: list[float]
    method: str  # "triton.testing.do_bench" or "cuda-events"

    @property
    def median(self) -> float:
        return statistics.median(self.samples_ms)

    def quantile(self, q: float) -> float:
        s = sorted(self.samples_ms)
        pos = q * (len(s) - 1)
        lo = int(pos)
        hi = min(lo + 1, len(s) - 1)
        return s[lo] + (s[hi] - s[lo]) * (pos - lo)

    def summary(self) -> dict:
        return {
            "ms": self.median,
            "ms_min": min(self.samples_ms),
            "ms_p20": self.quantile(0.2),
            "ms_p80": self.quantile(0.8),
            "ms_mean": statistics.fmean(self.samples_ms),
            "samples": len(self.samples_ms),
            "timer": self.method,
        }


_L2_FLUSH_BYTES = 256 * 1024 * 1024  # as triton's do_bench: 5x the H200's 50 MB L2
_FLUSH_MS_GUESS = 0.07


def _triton_do_bench():
    try:
        from triton.testing import do_bench
    except Exception:  # triton missing or broken: fall back to our own event loop
        return None
    return do_bench


def _event_once(fn: Callable[[], object]) -> float:
    import torch

    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    fn()
    end.record()
    torch.cuda.synchronize()
    return start.elapsed_time(end)


def _event_bench(fn, warmup_ms: float, rep_ms: float, grad_to_none: Sequence, min_samples: int = 1) -> list[float]:
    """do_bench's protocol without triton: estimate, warm up, then flush + event-bracketed calls."""
    import torch

    flush = torch.empty(_L2_FLUSH_BYTES // 4, dtype=torch.int32, device=DEVICE)
    fn()
    torch.cuda.synchronize()
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    start.record()
    for _ in range(5):
        flush.zero_()
        fn()
    end.record()
    torch.cuda.synchronize()
    est = max(start.elapsed_time(end) / 5, 1e-3)
    for _ in range(max(1, int(warmup_ms / est))):
        fn()
    n_rep = max(min_samples, int(rep_ms / est))
    starts = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    ends = [torch.cuda.Event(enable_timing=True) for _ in range(n_rep)]
    for i in range(n_rep):
        for t in grad_to_none:
            t.grad = None
        flush.zero_()
        starts[i].record()
        fn()
        ends[i].record()
    torch.cuda.synchronize()
    return [s.elapsed_time(e) for s, e in zip(starts, ends)]


def time_cuda(
    fn: Callable[[], object],
    *,
    warmup_ms: float,
    rep_ms: float,
    min_samples: int,
    grad_to_none: Sequence = (),
) -> Timing:
    """Median-ready CUDA-event samples of ``fn`` (already run once by the caller's sanity check).

    ``rep_ms`` is raised so that at least ``min_samples`` calls are timed: do_bench alone times
    rep / estimate calls, only ~3 for a 30 ms call."""
    est = _event_once(fn)
    rep = max(rep_ms, min_samples * (est + _FLUSH_MS_GUESS) * 1.25)
    grads = list(grad_to_none)
    do_bench = _triton_do_bench()
    if do_bench is not None:
        samples = None
        for _ in range(2):  # a second try with a longer span if the flush was slower than guessed
            try:
                samples = do_bench(fn, warmup=warmup_ms, rep=rep, grad_to_none=grads or None, return_mode="all")
            except (AssertionError, TypeError):  # a triton without return_mode="all": our own loop below
                samples = None
                break
            if len(samples) >= min_samples:
                break
            rep *= 1.3 * min_samples / max(len(samples), 1)
        if samples:
            return Timing([float(s) for s in samples], "triton.testing.do_bench")
    return Timing(_event_bench(fn, warmup_ms, rep, grads, min_samples), "cuda-events")


def peak_extra_mib(fn: Callable[[], object], grad_to_none: Sequence = ()) -> float:
    """Peak memory one call allocates on top of what exists before it (inputs, weights, modules), in MiB.
    Outputs (y, dx, dA, dB) count: they are memory the call makes the caller hold."""
    import torch

    for t in grad_to_none:
        t.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    out = fn()
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    del out
    for t in grad_to_none:
        t.grad = None
    return peak / 2**20


def wall_times_ms(step: Callable[[], object], n_warmup: int, n_timed: int) -> list[float]:
    """Host wall time of whole synchronized steps (Python overhead included: users pay it)."""
    import torch

    for _ in range(n_warmup):
        step()
    torch.cuda.synchronize()
    out = []
    for _ in range(n_timed):
        t0 = time.perf_counter()
        step()
        torch.cuda.synchronize()
        out.append((time.perf_counter() - t0) * 1e3)
    return out


def measure_ceilings(warmup_ms: float = 25.0, rep_ms: float = 100.0) -> dict:
    """The two ceilings of METHOD.md, measured as the anchors did: an 8192^3 bf16 GEMM through torch (cuBLAS)
    on random data, and a 1 GiB device-to-device copy counting bytes read + written."""
    import torch

    n = 8192
    copy_numel = 2**29  # bf16: 1 GiB

    def gemm_ms() -> float:
        a = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
        b = torch.randn(n, n, device=DEVICE, dtype=torch.bfloat16)
        return time_cuda(lambda: torch.mm(a, b), warmup_ms=warmup_ms, rep_ms=rep_ms, min_samples=10).median

    def copy_ms() -> float:
        src = torch.randn(copy_numel, device=DEVICE, dtype=torch.bfloat16)
        dst = torch.empty_like(src)
        return time_cuda(lambda: dst.copy_(src), warmup_ms=warmup_ms, rep_ms=rep_ms, min_samples=10).median

    t_mm, t_cp = gemm_ms(), copy_ms()  # each helper's tensors are freed when it returns
    torch.cuda.empty_cache()
    return {
        "bf16_gemm_8192_tflops": 2 * n**3 / (t_mm * 1e-3) / 1e12,
        "copy_tb_per_s": 2 * 2 * copy_numel / (t_cp * 1e-3) / 1e12,
        "gemm_ms": t_mm,
        "copy_ms": t_cp,
    }
