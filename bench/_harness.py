"""The bench session: runs the cells one at a time (a failing cell is recorded and the run goes on), keeps every
figure with its configuration, and writes <date>-<gpu>.json/.md/.png (the JSON also after each shape and e2e
cell, so a run that is killed keeps what it measured).

A cell's status: ok (timed), skipped (column unavailable here, path unsupported at this m, or the CUDA context
lost to an earlier error; reason says which) or error (it raised or gave non-finite outputs; reason).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import gc
import json
import platform
import re
import statistics
import subprocess
import time
from pathlib import Path

from . import _e2e, _impls, _sweep, _timing, report
from ._impls import err

BENCH_DIR = Path(__file__).resolve().parent
PROTOCOL = {
    "layers": (f"the columns of a row interleaved: each round times every column once, in the order of a "
               f"Williams design (over a period every column follows every other equally often); each timed call "
               f"follows a {_timing.FLUSH_BYTES >> 20} MB L2 flush and, up to {_timing.LEAD_IN_MAX_MS:g} ms, an "
               f"untimed call of its own (the host launches it while the GPU runs that one, as in training), and "
               f"is CUDA-event timed (triton.testing.do_bench's per-call protocol); {_timing.WARMUP_ROUNDS} "
               f"untimed rounds, then whole periods, about {_timing.ROUNDS_MIN}-{_timing.ROUNDS_MAX} rounds (enough "
               f"for {_timing.ROW_MS:g} ms of the row's calls); a cell's time is the median of its samples"),
    "spread": "(max - min) / median of the medians of the first, second and last third of the rounds",
    "host_bound": (f"host launch time of a call (GPU idle at its start) >= {_timing.HOST_BOUND} x its event-timed "
                   "median: the host, not the GPU, sets the pace"),
    "graph_ms": (f"cells at m <= {_sweep.GRAPH_MAX_M}, cells whose synchronized wall time is <= "
                 f"{_sweep.GRAPH_WALL_MS:g} ms and cells whose host launch time is >= {_timing.HOST_BOUND} x "
                 "their synchronized wall time: the call (fwd, or fwd + backward) captured in a CUDA graph, the "
                 "replay timed as the layers are (GPU time without the host's launch cost; graph_reason when capture "
                 "failed)"),
    "peak_extra_mib": "max_memory_allocated during one call minus memory_allocated before it",
    "workspace_mib": "qlora_ext.workspace_bytes() after the cell (persistent, shared by all layers)",
    "e2e": "median wall time of synchronized training steps after the warm-up steps",
}


def environment() -> dict:
    import torch

    p = torch.cuda.get_device_properties(0)
    gpu = {"name": p.name, "short": re.sub(r"[^a-z0-9]+", "-", p.name.lower().replace("nvidia", "")).strip("-"),
           "capability": f"{p.major}.{p.minor}", "sm_count": p.multi_processor_count,
           "memory_gib": round(p.total_memory / 2**30, 1)}
    versions = {"python": platform.python_version(), "torch": torch.__version__, "cuda": torch.version.cuda}
    for name in ("triton", "bitsandbytes", "peft", "transformers", "torchao", "pytest_benchmark", "qlora_ext"):
        with contextlib.suppress(Exception):
            versions[name] = str(getattr(__import__(name), "__version__", "?"))
    with contextlib.suppress(Exception):
        versions["qlora_ext_cuda_kernels"] = __import__("qlora_ext").has_cuda_kernels()
    git = {}
    with contextlib.suppress(Exception):
        def run(*a):
            return subprocess.run(["git", *a], cwd=BENCH_DIR, capture_output=True, text=True, check=True).stdout.strip()
        git = {"commit": run("rev-parse", "HEAD"), "dirty": bool(run("status", "--porcelain", "--untracked-files=no"))}
    return {"gpu": gpu, "versions": versions, "git": git}


def _sanity(cell, outs) -> None:
    """Benchmarks don't check correctness (tests/ does), but timing garbage is worthless: y must be [m, n] and
    every output and gradient must exist and be finite."""
    import torch

    want = (cell.m, _sweep.kn(cell.shape)[1])
    if not outs or outs[0] is None or tuple(outs[0].shape) != want:
        raise RuntimeError(f"sanity: y is {outs and outs[0] is not None and tuple(outs[0].shape)}, expected {want}")
    for i, t in enumerate(outs):
        if t is None or not bool(torch.isfinite(t).all()):
            raise FloatingPointError(f"sanity: output {i} (y, dx, gradients) is "
                                     f"{'not finite' if t is not None else 'missing'}")


class Bench:
    def __init__(self, o):
        self.o = o  # the options (conftest._options)
        self.cells: list[dict] = []
        self.e2e: list[dict] = []
        self.t0 = time.time()
        self.started, self.broken = False, None
        self.reasons: dict = {}
        self.env: dict = {}
        self.ceilings = None
        self.ws: _impls.Workspace | None = None
        self.shape_t0 = 0.0
        self.model = None  # (implementation, model, weights MiB) of the e2e implementation being run
        # Layer rows: the columns of a row are built and checked one item at a time, then timed side by side when
        # its last column (row_sizes: columns per row among the collected items) has been built.
        self.row_sizes: dict[str, int] = {}
        self.seen: dict[str, int] = {}
        self.pending: dict[str, list] = {}

    def start(self) -> None:
        import torch

        self.started = True
        torch.backends.cuda.matmul.allow_tf32 = False
        self.env = environment()
        self.reasons = {c: _impls.probe(c) for c in dict.fromkeys(self.o.cols + self.o.e2e_cols)}
        try:
            self.ceilings = _timing.ceilings()
        except Exception as e:  # the layers matter more than the ceilings
            self.ceilings = {"error": err(e)}

    def _skip_reason(self, col, cell=None) -> str | None:
        if self.broken:
            return f"CUDA context unusable after an earlier error: {self.broken}"
        if self.reasons.get(col) or cell is None:
            return self.reasons.get(col)
        if col == "reference" and cell.m > _sweep.REFERENCE_MAX_M and not self.o.reference_all_m:
            return (f"the default sweep times the unfused reference at m <= {_sweep.REFERENCE_MAX_M} "
                    "(name it in --bench-cols to time it at every m)")
        return _impls.unsupported(col, cell.m, _sweep.kn(cell.shape)[1], cell.mode)

    def close_shape(self) -> None:
        if self.ws is not None:
            self.ws.release()
            self.o.log(f"qlora_ext bench: {self.ws.shape} done in {time.time() - self.shape_t0:.0f} s "
                       f"(session {time.time() - self.t0:.0f} s)")
            self.ws = None
            self.dump(complete=False)

    def _failed(self, row: dict, e: BaseException) -> None:
        """Record the error; some CUDA errors (illegal address, ...) poison the context: then skip the rest."""
        row.update(status="error", reason=err(e))
        self._check_context(e)

    def _check_context(self, e: BaseException) -> None:
        """After error e: if the CUDA context no longer works, every later cell skips (self.broken says why)."""
        import torch

        if not isinstance(e, torch.cuda.OutOfMemoryError):
            try:
                torch.cuda.synchronize()
                torch.zeros(1, device=_impls.DEVICE).add_(1).item()
            except Exception as e2:
                self.broken = f"{err(e)[:200]} (then {err(e2)[:200]})"
        if not self.broken:
            gc.collect()
            torch.cuda.empty_cache()

    def run_layer(self, cell, benchmark) -> dict:
        k, n = _sweep.kn(cell.shape)
        row = {"shape": cell.shape, "k": k, "n": n, "m": cell.m, "r": cell.r, "mode": cell.mode,
               "implementation": cell.column, "status": "ok", "reason": None}
        self.cells.append(row)
        t_start = time.time()
        row["reason"] = self._skip_reason(cell.column, cell)
        if row["reason"]:
            row["status"] = "skipped"
        try:
            if row["status"] == "ok":
                self._build_layer(cell, row, benchmark)
        except Exception as e:  # a failing column (ours included) is recorded and the run goes on
            self._failed(row, e)
        row["cell_s"] = round(time.time() - t_start, 3)
        self.seen[cell.row] = self.seen.get(cell.row, 0) + 1
        if self.seen[cell.row] >= self.row_sizes.get(cell.row, 1):
            late = self._time_row(cell.row, row)
            if late and row["status"] != "error":  # an earlier column failed while timed: this item reports it
                row = {**row, "status": "error", "reason": "; ".join(late)}
        return row

    def _build_layer(self, cell, row: dict, benchmark) -> None:
        """Build the column's call, check its outputs once, record its host time and memory, and queue it for
        the row's timing."""
        if self.ws is None or self.ws.shape != cell.shape:
            self.close_shape()
            self.ws, self.shape_t0 = _impls.Workspace(cell.shape), time.time()
        qlora = cell.column.startswith("qlora_ext")
        path = _sweep.path_of(cell.column)
        context = (lambda: _impls.forced(path)) if qlora else contextlib.nullcontext
        with context():
            fn, grads = _impls.build(self.ws, cell)
            t0 = time.perf_counter()
            _sanity(cell, fn())
            first_ms = (time.perf_counter() - t0) * 1e3
            # host_ms is a median: the first calls of a fresh layer pay one-time host work (at 5 samples the bench
            # read 0.37 ms for a call that takes 0.09 ms warm), so short calls get enough samples to pass it
            n_host = 21 if first_ms < 5 else 5 if first_ms < 50 else 3
            row.update(_timing.host_and_memory(benchmark, fn, grads, n_host))
            if qlora:
                row["workspace_mib"] = _impls.workspace_mib()
        self.pending.setdefault(cell.row, []).append((row, (fn, grads, row["wall_ms"], context), None))
        if (cell.m <= _sweep.GRAPH_MAX_M or row["wall_ms"] <= _sweep.GRAPH_WALL_MS
                or row["host_ms"] >= _timing.HOST_BOUND * row["wall_ms"]):
            # the GPU time without the host (see PROTOCOL): where the host sets the pace of the eager call
            try:
                with context():
                    replay = _timing.graphed(fn, grads)
            except Exception as e:  # noqa: BLE001  (a column that cannot be captured keeps its event timing)
                row["graph_reason"] = err(e)
                self._check_context(e)
            else:
                self.pending[cell.row].append((row, (replay, (), row["wall_ms"], context), "graph"))

    def _time_row(self, key: str, current: dict) -> list[str]:
        """Event-time the row's columns side by side (_timing.gpu_times), once its last column is built; -> the
        errors of the columns other than ``current`` (the running item's), which that item reports: the items of
        the earlier columns have passed already."""
        entries = self.pending.pop(key, [])
        late = []
        for (row, _, what), res in zip(entries, _timing.gpu_times([call for _, call, _ in entries])):
            if what == "graph":
                if isinstance(res, BaseException):
                    row["graph_reason"] = err(res)
                    self._check_context(res)
                else:
                    row.update(graph_ms=res["median_ms"], graph_spread=res["spread"])
                continue
            if isinstance(res, BaseException):
                self._failed(row, res)
                if row is not current:
                    late.append(f"{row['implementation']}: {row['reason']}")
                continue
            row.update(res)
            row["host_bound"] = row["host_ms"] >= _timing.HOST_BOUND * row["median_ms"]
        return late

    def run_e2e(self, impl: str, batch: int, benchmark) -> dict:
        import torch

        cfg = self.o.e2e
        row = {"implementation": impl, "batch": batch, **dataclasses.asdict(cfg), "status": "ok",
               "reason": self._skip_reason(impl)}
        if row["reason"]:
            row["status"] = "skipped"
            self.e2e.append(row)
            return row
        self.close_shape()
        try:
            with _impls.forced(None) if impl == "qlora_ext" else contextlib.nullcontext():
                if self.model is None or self.model[0] != impl:
                    self.model = None
                    gc.collect()
                    torch.cuda.empty_cache()
                    before = torch.cuda.memory_allocated()
                    model = _e2e.build(impl, cfg)
                    self.model = (impl, model, (torch.cuda.memory_allocated() - before) / 2**20)
                step, stats = _e2e.step_fn(self.model[1], batch, cfg)
                base = torch.cuda.memory_allocated()
                torch.cuda.reset_peak_memory_stats()
                for _ in range(cfg.warmup_steps):
                    step()
                _timing.rounds(benchmark, step, cfg.timed_steps)
                peak = (torch.cuda.max_memory_allocated() - base) / 2**20
            if not all(abs(v) < float("inf") for v in stats["loss"]):  # NaN fails the comparison too
                raise FloatingPointError(f"non-finite loss: {stats['loss']}")
            med = statistics.median(stats["step_ms"][cfg.warmup_steps:])
            row.update(step_ms=med, steps_ms=stats["step_ms"][cfg.warmup_steps:], peak_extra_mib=peak,
                       tokens_per_s=batch * cfg.seq / med * 1e3, weights_mib=self.model[2],
                       trainable_params=stats["trainable_params"], loss_first=stats["loss"][0],
                       loss_last=stats["loss"][-1])
        except Exception as e:
            self.model = None
            self._failed(row, e)
        self.e2e.append(row)
        self.dump(complete=False)
        return row

    def release(self) -> None:
        self.model = None
        with contextlib.suppress(Exception):  # freeing memory at the end must never become a test error
            self.close_shape()

    def document(self, complete: bool) -> dict:
        o, now = self.o, datetime.datetime.now(datetime.timezone.utc)
        return {
            "schema": "qlora_ext-bench/2", "date": now.date().isoformat(),
            "timestamp": now.isoformat(timespec="seconds"),
            **self.env,
            "run": {"full": o.full and complete, "complete": complete, "command": o.command, "shapes": list(o.shapes),
                    "m": list(o.ms), "r": list(o.rs), "modes": list(o.modes), "columns": list(o.cols),
                    "e2e": {**dataclasses.asdict(o.e2e), "batches": list(o.e2e_batches), "columns": list(o.e2e_cols)},
                    "elapsed_s": round(time.time() - self.t0, 1)},
            "timing": PROTOCOL, "ceilings": self.ceilings,
            "columns": {c: self.reasons.get(c) for c in dict.fromkeys(o.cols + o.e2e_cols)},
            "cells": [c for c in self.cells if c["status"] != "ok" or "cell_s" in c],  # not the one running
            "e2e": self.e2e,
        }

    def dump(self, complete: bool) -> tuple[dict, Path]:
        doc = self.document(complete)
        tag = re.sub(r"[^\w.-]+", "-", self.o.tag or ("" if self.o.full else "partial"))
        stem = f"{doc['date']}-{doc['gpu'].get('short', 'gpu')}" + (f"-{tag}" if tag else "")
        path = (self.o.out_dir or BENCH_DIR / "results") / f"{stem}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(doc, indent=1))
        return doc, path

    def write(self, complete: bool) -> tuple[dict, list[str]]:
        doc, path = self.dump(complete)
        return doc, [str(path)] + report.write(doc, path)
