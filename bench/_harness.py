"""The bench session: runs one cell at a time, never lets one cell's failure stop the run, collects every
figure with its configuration, and writes JSON + RESULTS.md + PNG at the end (bench/report.py renders).

A cell is one (layer case, implementation) or one (e2e implementation, batch). Its row records status:
    ok           timed; ms = median of the CUDA-event samples
    unavailable  the implementation cannot run here (package missing): reason says why
    error        it raised (or produced non-finite outputs): reason is the error string
    skipped      not attempted, because an earlier error left the CUDA context unusable
"""

from __future__ import annotations

import dataclasses
import datetime as _dt
import gc
import json
import os
import re
import statistics
import subprocess
import time
import warnings
from pathlib import Path

from . import _e2e, _impls, _sweep, _timing

BENCH_DIR = Path(__file__).resolve().parent
REPO_ROOT = BENCH_DIR.parent
SCHEMA = "qlora_ext-bench/1"
ENV_OUT = "QLORA_BENCH_OUT"


@dataclasses.dataclass
class BenchOptions:
    sweep: _sweep.Sweep
    cases: list[_sweep.Case]
    impls: tuple[str, ...]
    e2e: _sweep.E2ESweep
    e2e_impls: tuple[str, ...]
    out_dir: Path | None = None
    tag: str | None = None
    partial: bool = False  # a selection / filter was applied: output names say so
    adapter_dtype: str = "bf16"
    fwd_grad: bool = False  # mode fwd with autograd recording instead of no_grad
    warmup_ms: float = 25.0
    rep_ms: float = 100.0
    min_samples: int = 10
    measure_ceilings: bool = True
    selection: dict = dataclasses.field(default_factory=dict)  # the raw options, for the JSON

    def estimate(self) -> dict:
        return _sweep.estimate_seconds(self.cases, self.impls, self.sweep, self.e2e_impls)


def gpu_short_name(name: str) -> str:
    """'NVIDIA H200' -> 'h200'; 'NVIDIA H100 80GB HBM3' -> 'h100-80gb-hbm3'."""
    s = name.lower()
    for word in ("nvidia", "geforce", "tesla"):
        s = s.replace(word, " ")
    s = re.sub(r"[^a-z0-9]+", "-", s).strip("-")
    return s or "gpu"


def _git_info() -> dict:
    def git(*args):
        return subprocess.run(
            ["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=10, check=True
        ).stdout.strip()

    try:
        return {"commit": git("rev-parse", "HEAD"), "dirty": bool(git("status", "--porcelain", "--untracked-files=no"))}
    except Exception as e:  # no git, no commits yet, or a copy of the tree without .git
        return {"commit": None, "note": _impls._err(e)[:200]}


def gpu_info() -> dict:
    import torch

    p = torch.cuda.get_device_properties(0)
    info = {
        "name": p.name,
        "short": gpu_short_name(p.name),
        "capability": f"{p.major}.{p.minor}",
        "sm_count": p.multi_processor_count,
        "memory_MiB": round(p.total_memory / 2**20),
    }
    try:
        q = subprocess.run(
            ["nvidia-smi", "--query-gpu=driver_version,clocks.max.sm,clocks.max.mem,power.limit", "--format=csv,noheader"],
            capture_output=True,
            text=True,
            timeout=10,
            check=True,
        ).stdout.strip().splitlines()[0]
        info["driver"], info["max_sm_clock"], info["max_mem_clock"], info["power_limit"] = [v.strip() for v in q.split(",")]
    except Exception:  # nvidia-smi absent: the rest still identifies the card
        pass
    return info


def _short_warning(w: warnings.WarningMessage) -> str:
    text = str(w.message).strip().splitlines()[0] if str(w.message).strip() else ""
    return f"{w.category.__name__}: {text[:200]}"


class BenchSession:
    def __init__(self, opts: BenchOptions):
        self.opts = opts
        self.layer_rows: list[dict] = []
        self.e2e_rows: list[dict] = []
        self.samples: dict[str, list[float]] = {}  # cell id -> samples (for pytest-benchmark; not in the JSON)
        self.t0 = time.time()
        self.started = False
        self.broken: str | None = None
        self.impls: dict = {}
        self.impl_warnings: dict[str, list[str]] = {}
        self.env: dict = {}
        self.ceilings: dict | None = None
        self.ws: _impls.Workspace | None = None
        self._e2e_model = None  # (impl, model, notes, weights_MiB) of the e2e implementation being run
        self.durations = {"layers_s": 0.0, "e2e_s": 0.0}

    # ---- session start (only on a CUDA machine) ----
    def start(self) -> None:
        if self.started:
            return
        import torch

        self.started = True
        torch.backends.cuda.matmul.allow_tf32 = False  # bf16 everywhere; keep any fp32 matmul honest
        self.env = {"gpu": gpu_info(), "versions": _impls.versions(), "git": _git_info()}
        self.impls = _impls.probe()
        if self.opts.measure_ceilings:
            try:
                self.ceilings = _timing.measure_ceilings()
            except Exception as e:  # a ceiling failing must not stop the layers; the report falls back
                self.ceilings = {"error": _impls._err(e)}
        self.ws = _impls.Workspace(_timing.DEVICE, adapter_dtype=self.opts.adapter_dtype, fwd_grad=self.opts.fwd_grad)

    # ---- one layer cell ----
    def _base_layer_row(self, case: _sweep.Case, impl: str) -> dict:
        s = case.shape
        fl = _sweep.layer_flops(s.k, s.n, case.m, case.r, case.mode)
        return {
            "cell": case.cell_id(impl),
            "case": case.id,
            "impl": impl,
            "model": s.model,
            "layer": s.layer,
            "k": s.k,
            "n": s.n,
            "m": case.m,
            "r": case.r,
            "lora_alpha": _sweep.LORA_ALPHA,
            "dropout": case.dropout,
            "mode": case.mode,
            "dtype": "bfloat16",
            "flops_frozen": fl["frozen"],
            "flops_lora": fl["lora"],
            "status": None,
            "reason": None,
            "notes": [],
        }

    def _check_context(self, err: BaseException) -> None:
        """After an exception, find out whether the CUDA context still works (illegal address etc. are sticky)."""
        import torch

        try:
            torch.cuda.synchronize()
            torch.zeros(1, device=_timing.DEVICE).add_(1).item()
        except Exception as e2:
            self.broken = f"{_impls._err(err)[:300]} (then: {_impls._err(e2)[:200]})"

    def run_layer(self, case: _sweep.Case, impl: str) -> dict:
        import torch

        row = self._base_layer_row(case, impl)
        t_start = time.time()
        if self.broken:
            row.update(status="skipped", reason=f"CUDA context unusable after an earlier error: {self.broken}")
            return self._keep(row)
        avail = self.impls.get(impl, {"available": False, "reason": "unknown implementation"})
        if not avail["available"]:
            row.update(status="unavailable", reason=avail["reason"])
            return self._keep(row)
        ws = self.ws
        self._e2e_model = None
        if ws.shape_id is not None and ws.shape_id != case.shape.id:
            self.checkpoint()  # a shape is done: keep what we have in case the run is killed later
        ws.enter(case.shape)
        prep = None
        try:
            with warnings.catch_warnings(record=True) as caught:  # e.g. "no CUDA kernels: running the reference"
                warnings.simplefilter("always")
                prep = _impls.BUILDERS[impl](ws, case)
                outs = prep.run()
                torch.cuda.synchronize()
            row["notes"] += prep.notes
            msgs = list(dict.fromkeys(_short_warning(w) for w in caught))
            if msgs:
                row["notes"] += msgs[:3]
                seen = self.impl_warnings.setdefault(impl, [])
                seen += [m for m in msgs if m not in seen][:5]
            self._sanity(case, outs)
            del outs
            timing = _timing.time_cuda(
                prep.run,
                warmup_ms=self.opts.warmup_ms,
                rep_ms=self.opts.rep_ms,
                min_samples=self.opts.min_samples,
                grad_to_none=prep.grads,
            )
            peak = _timing.peak_extra_mib(prep.run, prep.grads)
            summary = timing.summary()
            row.update(summary)
            row["peak_extra_MiB"] = peak
            row["tflops"] = row["flops_frozen"] / (summary["ms"] * 1e-3) / 1e12
            row["status"] = "ok"
            self.samples[row["cell"]] = timing.samples_ms
        except _impls.Unavailable as e:
            row.update(status="unavailable", reason=str(e))
        except torch.cuda.OutOfMemoryError as e:
            row.update(status="error", reason=f"OutOfMemoryError: {str(e).splitlines()[0][:300]}")
        except Exception as e:  # a failing baseline (or ours) is recorded, and the run goes on
            row.update(status="error", reason=_impls._err(e)[:1000])
            self._check_context(e)
        finally:
            if prep is not None:
                for t in prep.grads:
                    t.grad = None
            prep = None
            if row["status"] != "ok" and not self.broken:
                torch.cuda.empty_cache()
        row["wall_s"] = round(time.time() - t_start, 3)
        self.durations["layers_s"] += time.time() - t_start
        return self._keep(row)

    @staticmethod
    def _sanity(case: _sweep.Case, outs) -> None:
        """Benchmarks don't assert correctness (tests/ does), but a timing of garbage is worthless:
        outputs must exist, y must be [m, n], everything finite."""
        import torch

        names = ["y", "dx", "grad of trainable 1", "grad of trainable 2", "grad of trainable 3"]
        if case.mode == "fwd":
            names = ["y", "u"]
        if not outs or outs[0] is None or tuple(outs[0].shape) != (case.m, case.shape.n):
            got = None if not outs or outs[0] is None else tuple(outs[0].shape)
            raise RuntimeError(f"sanity: y has shape {got}, expected {(case.m, case.shape.n)}")
        for name, t in zip(names, outs):
            if t is None:
                raise RuntimeError(f"sanity: {name} was not produced (None)")
            if not bool(torch.isfinite(t).all()):
                raise FloatingPointError(f"sanity: {name} has non-finite values")

    def _keep(self, row: dict) -> dict:
        self.layer_rows.append(row)
        return row

    # ---- one e2e cell ----
    def run_e2e(self, impl: str, batch: int) -> dict:
        import torch

        e2e = self.opts.e2e
        row = {
            "cell": f"e2e-b{batch}-{impl}",
            "impl": impl,
            "batch": batch,
            "seq": e2e.seq,
            "layers": e2e.layers,
            "vocab": e2e.vocab,
            "hidden": e2e.hidden,
            "intermediate": e2e.intermediate,
            "heads": e2e.heads,
            "kv_heads": e2e.kv_heads,
            "r": e2e.r,
            "lora_alpha": e2e.lora_alpha,
            "warmup_steps": e2e.warmup_steps,
            "timed_steps": e2e.timed_steps,
            "status": None,
            "reason": None,
            "notes": [],
        }
        t_start = time.time()
        if self.broken:
            row.update(status="skipped", reason=f"CUDA context unusable after an earlier error: {self.broken}")
            return self._keep_e2e(row)
        if self.ws is not None:
            self.ws.release()  # layer weights are not needed any more
        try:
            if self._e2e_model is None or self._e2e_model[0] != impl:
                self._e2e_model = None
                gc.collect()  # PEFT models hold reference cycles: free the previous model before building
                torch.cuda.empty_cache()
                torch.cuda.synchronize()
                before = torch.cuda.memory_allocated()
                with warnings.catch_warnings(record=True) as caught:
                    warnings.simplefilter("always")
                    model, notes = _e2e.build(impl, e2e, _timing.DEVICE, self.opts.adapter_dtype)
                torch.cuda.synchronize()
                weights = (torch.cuda.memory_allocated() - before) / 2**20
                notes += list(dict.fromkeys(_short_warning(w) for w in caught))[:3]
                self._e2e_model = (impl, model, notes, weights)
            _, model, notes, weights = self._e2e_model
            row["notes"] += notes
            row["weights_MiB"] = weights
            res = _e2e.run(model, batch, e2e, _timing.wall_times_ms)
            times = res["step_ms_all"]
            med = statistics.median(times)
            row.update(res)
            row["step_ms"] = med
            row["tokens_per_s"] = batch * e2e.seq / (med * 1e-3)
            row["status"] = "ok"
            self.samples[row["cell"]] = times
        except _impls.Unavailable as e:
            row.update(status="unavailable", reason=str(e))
        except torch.cuda.OutOfMemoryError as e:
            row.update(status="error", reason=f"OutOfMemoryError: {str(e).splitlines()[0][:300]}")
            self._e2e_model = None
        except Exception as e:
            row.update(status="error", reason=_impls._err(e)[:1000])
            self._e2e_model = None
            self._check_context(e)
        finally:
            if not self.broken:
                torch.cuda.empty_cache()
        row["wall_s"] = round(time.time() - t_start, 3)
        self.durations["e2e_s"] += time.time() - t_start
        return self._keep_e2e(row)

    def _keep_e2e(self, row: dict) -> dict:
        self.e2e_rows.append(row)
        self.checkpoint()
        return row

    def checkpoint(self) -> None:
        """Write the JSON so far (marked incomplete): a run killed by a time limit still leaves its figures."""
        try:
            doc = self.document(complete=False)
            path = self.output_paths(doc)["json"]
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(".json.tmp")
            tmp.write_text(json.dumps(doc, indent=1, default=str))
            tmp.replace(path)
        except Exception as e:  # a checkpoint is a convenience; the final write reports its own errors
            warnings.warn(f"bench checkpoint not written: {_impls._err(e)}", stacklevel=2)

    def release(self) -> None:
        self._e2e_model = None
        if self.ws is not None and not self.broken:
            try:
                self.ws.release()
            except Exception as e:  # freeing must never turn into a test error
                warnings.warn(f"bench: releasing GPU memory failed: {_impls._err(e)}", stacklevel=2)

    # ---- output ----
    def document(self, complete: bool) -> dict:
        impls = {k: dict(v) for k, v in self.impls.items()}
        for k, msgs in self.impl_warnings.items():
            impls.setdefault(k, {})["warnings"] = msgs
        o = self.opts
        return {
            "schema": SCHEMA,
            "date": _dt.date.today().isoformat(),
            "timestamp": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
            **self.env,
            "sweep": {
                "name": o.sweep.name,
                "partial": o.partial,
                "complete": complete,
                "cases": len(o.cases),
                "impls": list(o.impls),
                "e2e_impls": list(o.e2e_impls),
                "selection": o.selection,
                "peft_adapter_dtype": o.adapter_dtype,
                "fwd_autograd": o.fwd_grad,
            },
            "timing": {
                "layers": "median of CUDA-event samples, triton.testing.do_bench protocol (warm-up, 256 MB L2 flush "
                "before every timed call, gradients reset to None); fwd under "
                + ("autograd recording (x requires grad, no backward)" if o.fwd_grad else "torch.no_grad()")
                + ", fwd+bwd = forward with autograd + backward(dy) with x requiring grad",
                "e2e": "median host wall time of synchronized training steps (fwd + loss + bwd + AdamW step)",
                "warmup_ms": o.warmup_ms,
                "rep_ms": o.rep_ms,
                "min_samples": o.min_samples,
                "tflops_counts": "frozen GEMM FLOPs only: 2mnk (fwd), 4mnk (fwd+bwd), as the anchors",
                "peak_extra": "max_memory_allocated during one call minus memory_allocated before it (inputs, "
                "weights, modules excluded; outputs and gradients included), MiB",
            },
            "ceilings": self.ceilings,
            "impls": impls,
            "layers": self.layer_rows,
            "e2e": self.e2e_rows,
            "durations_s": {
                "session": round(time.time() - self.t0, 1),
                "layers": round(self.durations["layers_s"], 1),
                "e2e": round(self.durations["e2e_s"], 1),
                "estimate": round(o.estimate()["total_s"], 1),
            },
        }

    def output_paths(self, doc: dict) -> dict[str, Path]:
        """JSON + PNG in the output dir (default bench/results/), RESULTS.md beside them when an output dir is
        given, else bench/RESULTS.md for complete default/full runs and bench/results/<stem>.md otherwise."""
        o = self.opts
        stem = f"{doc['date']}-{doc.get('gpu', {}).get('short', 'gpu')}"
        tag = o.tag or ("quick" if o.sweep.name == "quick" else "partial" if o.partial else None)
        if tag:
            stem += f"-{re.sub(r'[^A-Za-z0-9_.-]+', '-', tag)}"
        out_dir = o.out_dir or Path(os.environ.get(ENV_OUT, "") or BENCH_DIR / "results")
        explicit = o.out_dir is not None or bool(os.environ.get(ENV_OUT))
        if explicit:
            md = out_dir / "RESULTS.md"
        elif tag is None and doc["sweep"]["complete"]:
            md = BENCH_DIR / "RESULTS.md"
        else:
            md = out_dir / f"{stem}.md"
        return {"json": out_dir / f"{stem}.json", "png": out_dir / f"{stem}.png", "md": md}

    def write(self, complete: bool) -> dict[str, str]:
        """Write JSON, then render MD and PNG from it (each step's failure is reported, not raised)."""
        from . import report

        doc = self.document(complete)
        paths = self.output_paths(doc)
        paths["json"].parent.mkdir(parents=True, exist_ok=True)
        with open(paths["json"], "w") as f:
            json.dump(doc, f, indent=1, default=str)
        written = {"json": str(paths["json"])}
        try:
            written["png"] = report.write_plot(doc, paths["png"]) or "(not written: no data to plot)"
        except Exception as e:  # matplotlib missing: `python -m bench.report` can redo it elsewhere
            written["png"] = f"(not written: {_impls._err(e)[:200]})"
        try:
            png = Path(written["png"]) if not written["png"].startswith("(") else None
            paths["md"].parent.mkdir(parents=True, exist_ok=True)
            paths["md"].write_text(report.render_markdown(doc, json_path=paths["json"], png_path=png, md_path=paths["md"]))
            written["md"] = str(paths["md"])
        except Exception as e:
            written["md"] = f"(not written: {_impls._err(e)[:300]})"
        return written

    # ---- terminal ----
    def summary_lines(self) -> list[str]:
        """The stable table printed at the end of `pytest bench/`: median ms per case and implementation."""
        from . import report

        return report.terminal_table(self.layer_rows, self.e2e_rows)



def finish_test(row: dict, benchmark, session: BenchSession) -> None:
    """End a test item from its row: feed the GPU-time samples to pytest-benchmark, or skip / fail with the
    row's reason. Benchmarks don't assert performance; an error is a failed item, and the run goes on."""
    import pytest

    st = row["status"]
    if st == "ok":
        samples = session.samples.pop(row["cell"])
        if benchmark is not None:
            info = {k: row.get(k) for k in ("impl", "k", "n", "m", "r", "dropout", "mode", "batch", "seq", "ms", "timer",
                                            "peak_extra_MiB", "tflops", "step_ms", "tokens_per_s") if row.get(k) is not None}
            _timing.feed_benchmark(benchmark, samples, info)
        return
    if st in ("unavailable", "skipped"):
        pytest.skip(f"{row['impl']}: {row['reason']}")
    pytest.fail(f"{row['cell']}: {row['reason']}", pytrace=False)
