"""Checks of the bench suite's GPU-free parts, runnable anywhere:  python -m bench._selftest

- the sweeps, option parsing and floor formulas (against the figures ARCHITECTURE.md / issue 5 quote);
- every layer implementation's wiring, on the CPU with a tiny shape, fwd and fwd+bwd (those installed);
- the e2e model builders and the training step, on the CPU with a tiny Llama config;
- the GPU-time -> pytest-benchmark plumbing, through a real inner pytest session;
- report generation (JSON -> RESULTS.md + PNG + terminal table, targets, anchor matching) on synthetic rows,
  written to a temporary directory -- never into bench/results/ or bench/RESULTS.md.

`pytest bench/` itself stays one clean skip without CUDA, so these live here rather than as bench/ tests.
"""

from __future__ import annotations

import dataclasses
import json
import math
import subprocess
import sys
import tempfile
import textwrap
import time
from pathlib import Path

from . import _harness, _sweep, report

_CHECKS: list = []


def check(fn):
    _CHECKS.append(fn)
    return fn


@check
def sweeps_and_parsing():
    assert len(_sweep.FULL.cases()) == 7 * 6 * 2 * 2 * 2
    d = _sweep.DEFAULT.cases()
    assert len(d) == len({c.id for c in d}), "duplicate cases"
    assert {c.shape.id for c in d} == {s.id for s in _sweep.SHAPES}
    # cases of one shape are contiguous (weights freed once per shape)
    order = [c.shape.id for c in d]
    assert order == sorted(order, key=lambda s: [x.id for x in _sweep.SHAPES].index(s))
    est = _sweep.estimate_seconds(d, _sweep.IMPLS, _sweep.DEFAULT, _sweep.E2E_IMPLS)
    assert est["total_s"] < 300, f"default sweep estimated at {est['total_s']:.0f} s > 5 min"
    assert _sweep.parse_shapes("4096->14336, 70b") == ("4096x14336", "8192x8192", "8192x28672", "28672x8192")
    assert _sweep.parse_modes("fwd,train") == ("fwd", "fwd+bwd")
    for bad, fn in (("4096", _sweep.parse_shapes), ("x", lambda t: _sweep.parse_ints(t, "--bench-m")),
                    ("1.5", lambda t: _sweep.parse_floats(t, "--bench-dropout")), ("back", _sweep.parse_modes)):
        try:
            fn(bad)
        except ValueError as e:
            assert "--bench" in str(e), e
        else:
            raise AssertionError(f"{bad!r} was accepted")
    sel = _sweep.select(_sweep.DEFAULT, ms=(16384,), rs=(64,))
    assert {c.m for c in sel} == {16384} and {c.r for c in sel} == {64} and len({c.shape.id for c in sel}) == 7
    assert _sweep.select(_sweep.DEFAULT) == d


@check
def floors():
    # ARCHITECTURE.md §4: m=16384, k=4096, n=14336 is 1.92 TFLOP -> 2.47 ms at 779 TFLOP/s;
    # the NF4 bytes of 4096x14336 are 30.3 MB -> 7 µs at 4.27 TB/s (issue 5: 2x = 0.014 ms).
    fl = _sweep.layer_flops(4096, 14336, 16384, 16, "fwd")
    assert abs(fl["frozen"] / 1e12 - 1.924) < 0.005
    assert abs(fl["frozen"] / _sweep.H200_BF16_FLOPS * 1e3 - 2.47) < 0.01
    w = _sweep.nf4_weight_bytes(4096, 14336)
    assert abs(w / 1e6 - 30.3) < 0.05
    rf = _sweep.roofline_ms(4096, 14336, 1, 16, "fwd")
    assert abs(rf["nf4_byte_floor_ms"] - 0.0071) < 0.0001 and rf["bound"]["fwd"] == "memory"
    assert _sweep.roofline_ms(4096, 14336, 16384, 16, "fwd+bwd")["bound"] == {"fwd": "compute", "bwd": "compute"}
    assert _sweep.layer_flops(4096, 4096, 8, 16, "fwd+bwd")["frozen"] == 4 * 8 * 4096 * 4096
    md = report.floors_markdown()
    assert "| 4096→14336 | 16384 | fwd |" in md


def _tiny_case(mode, dropout=0.0, m=8):
    return _sweep.Case(_sweep.Shape("custom", "tiny", 128, 256), m, 16, dropout, mode)


@check
def layer_wiring_cpu():
    """Every installed implementation builds and runs on the CPU (tiny shape), outputs pass the sanity check."""
    from . import _impls

    ws = _impls.Workspace("cpu", adapter_dtype="bf16")
    ran, missing = [], []
    for mode in _sweep.MODES:
        for p in (0.0, 0.05):
            case = _tiny_case(mode, p)
            ws.enter(case.shape)
            for impl in _sweep.IMPLS:  # cublas' builder is plain torch.mm: it runs on the CPU too
                try:
                    prep = _impls.BUILDERS[impl](ws, case)
                except _impls.Unavailable as e:
                    missing.append(f"{impl}: {e}")
                    continue
                outs = prep.run()
                _harness.BenchSession._sanity(case, outs)
                if mode == "fwd+bwd":
                    assert len(outs) >= (2 if impl == "cublas" else 4), (impl, len(outs))
                    for t in prep.grads:
                        assert t.grad is not None, (impl, "grad missing")
                        t.grad = None
                ran.append(f"{impl}/{mode}/p{p}")
    # --bench-fwd-grad: the forward records autograd (y requires grad) instead of running under no_grad
    ws_g = _impls.Workspace("cpu", fwd_grad=True)
    case = _tiny_case("fwd")
    ws_g.enter(case.shape)
    for impl in ("ours", "bnb_peft", "bf16_peft", "torchao"):
        try:
            y = _impls.BUILDERS[impl](ws_g, case).run()[0]
        except _impls.Unavailable:
            continue
        assert y.requires_grad, impl
    ws_g.release()
    # same weights and inputs: at p=0 bf16+PEFT and cuBLAS agree on y up to the LoRA term (B random, s=2)
    case = _tiny_case("fwd")
    ws.enter(case.shape)
    y_cub = _impls.build_cublas(ws, case).run()[0].float()
    try:
        y_peft = _impls.build_bf16_peft(ws, case).run()[0].float()
        x, _ = ws.inputs(case, False)
        a, b = ws.lora(case.shape, case.r)
        lora = (_sweep.LORA_ALPHA / case.r) * (x.float() @ a.float().t()) @ b.float().t()
        err = (y_peft - y_cub - lora).norm() / (y_cub + lora).norm()
        assert err < 2e-2, f"bf16+PEFT does not use the shared weights (rel err {err:.3g})"
    except _impls.Unavailable:
        pass
    ws.release()
    assert any(r.startswith("cublas/") for r in ran)
    return f"ran {len(ran)} (impl/mode/dropout); not here: {sorted(set(missing))}"


@check
def e2e_wiring_cpu():
    """The e2e builders and a training step, on the CPU with a tiny Llama config."""
    from . import _e2e, _impls

    tiny = _sweep.E2ESweep(batches=(2,), seq=16, layers=2, vocab=128, hidden=64, intermediate=128, heads=4, kv_heads=2,
                           warmup_steps=1, timed_steps=2)

    def cpu_timer(step, n_warmup, n_timed):
        for _ in range(n_warmup):
            step()
        out = []
        for _ in range(n_timed):
            t0 = time.perf_counter()
            step()
            out.append((time.perf_counter() - t0) * 1e3)
        return out

    done, missing = [], []
    for impl in _sweep.E2E_IMPLS:
        try:
            model, notes = _e2e.build(impl, tiny, "cpu")
        except _impls.Unavailable as e:
            missing.append(f"{impl}: {e}")
            continue
        res = _e2e.run(model, 2, tiny, cpu_timer)
        expected = tiny.layers * tiny.r * (  # q, k, v, o, gate, up, down: r * (in + out) each
            (64 + 64) + 2 * (64 + 32) + (64 + 64) + 2 * (64 + 128) + (128 + 64))
        assert res["trainable_params"] == expected, (impl, res["trainable_params"], expected, notes)
        assert len(res["step_ms_all"]) == 2 and math.isfinite(res["loss_last"])
        done.append(f"{impl} ({res['trainable_dtype']}; {notes[0] if notes else ''})")
        del model
    return f"ran {done}; not here: {missing}"


@check
def pytest_benchmark_gets_gpu_time():
    """Samples fed through the marker timer come out as pytest-benchmark's statistics, unchanged."""
    try:
        import pytest_benchmark  # noqa: F401
    except ImportError:
        return "pytest-benchmark not installed: skipped"
    samples = [0.5, 0.25, 1.0, 0.75, 0.3]  # ms
    with tempfile.TemporaryDirectory() as d:
        test = Path(d) / "test_feed.py"
        test.write_text(textwrap.dedent(f"""
            import pytest
            from bench._timing import feed_benchmark, gpu_time_clock

            @pytest.mark.benchmark(timer=gpu_time_clock, group="g")
            def test_feed(benchmark):
                feed_benchmark(benchmark, {samples!r}, {{"impl": "x"}})
        """))
        out = Path(d) / "bench.json"
        root = Path(__file__).resolve().parent.parent
        proc = subprocess.run(
            [sys.executable, "-m", "pytest", "-q", "-p", "no:cacheprovider", str(test), f"--benchmark-json={out}",
             f"--rootdir={d}"],
            cwd=d, capture_output=True, text=True, timeout=120, env={**__import__("os").environ, "PYTHONPATH": str(root)},
        )
        assert proc.returncode == 0, proc.stdout + proc.stderr
        b = json.loads(out.read_text())["benchmarks"][0]
    st = b["stats"]
    assert st["rounds"] == len(samples)
    assert abs(st["median"] - 0.5e-3) < 1e-12 and abs(st["min"] - 0.25e-3) < 1e-12 and abs(st["max"] - 1e-3) < 1e-12
    assert b["options"]["timer"].endswith("gpu_time_clock") and b["extra_info"] == {"impl": "x"}
    return "median/min/max/rounds of the table = the fed CUDA-event samples"


def synthetic_doc() -> dict:
    """A plausible fake run: every impl on two target shapes and one other, a few m, both modes, plus e2e,
    one error, one unavailable column. Numbers are made up; only the rendering is under test."""
    rows = []
    for shape_id in ("4096x14336", "8192x28672", "4096x4096"):
        s = _sweep.SHAPE_BY_ID[shape_id]
        for m in (1, 16, 2048, 16384):
            for mode in _sweep.MODES:
                case = _sweep.Case(s, m, 16, 0.0, mode)
                floor = _sweep.gemm_floor_ms(s.k, s.n, m, mode, 560e12)
                factors = {"cublas": 1.0, "ours": 1.02 if m >= 2048 else 0.4, "reference": 1.9, "bnb_peft": 1.6,
                           "bf16_peft": 1.25, "torchao": 1.5}
                for impl in _sweep.IMPLS:
                    row = {"cell": case.cell_id(impl), "case": case.id, "impl": impl, "model": s.model, "layer": s.layer,
                           "k": s.k, "n": s.n, "m": m, "r": 16, "lora_alpha": 32, "dropout": 0.0, "mode": mode,
                           "flops_frozen": _sweep.layer_flops(s.k, s.n, m, 16, mode)["frozen"], "notes": []}
                    if impl == "torchao":
                        row.update(status="unavailable", reason="ModuleNotFoundError: No module named 'torchao'")
                    elif impl == "reference" and m == 16384 and shape_id == "8192x28672":
                        row.update(status="error", reason="OutOfMemoryError: CUDA out of memory | tried 9 GiB")
                    else:
                        ms = floor * factors[impl] + (0.3 if impl == "bnb_peft" else 0.0)
                        row.update(status="ok", reason=None, ms=ms, ms_min=ms * 0.98, ms_p20=ms * 0.99, ms_p80=ms * 1.01,
                                   samples=50, timer="triton.testing.do_bench", tflops=row["flops_frozen"] / ms / 1e9,
                                   peak_extra_MiB=(2 * m * s.n + (2 * m * s.k if mode == "fwd+bwd" else 0)) / 2**20
                                   + (2 * s.n * s.k / 2**20 if impl in ("bnb_peft", "reference") else 0.1))
                    rows.append(row)
    e2e = []
    for b in (2, 8):
        for impl, tps in (("ours", 120000), ("bnb_peft", 76000), ("bf16_peft", 91000)):
            step = b * 2048 / tps * 1e3
            e2e.append({"cell": f"e2e-b{b}-{impl}", "impl": impl, "batch": b, "seq": 2048, "layers": 4, "vocab": 32000,
                        "hidden": 4096, "intermediate": 14336, "heads": 32, "kv_heads": 8, "r": 16, "lora_alpha": 32,
                        "warmup_steps": 3, "timed_steps": 7, "status": "ok", "reason": None, "notes": ["synthetic"],
                        "step_ms": step, "step_ms_all": [step] * 7, "tokens_per_s": tps, "weights_MiB": 1000.0,
                        "peak_extra_MiB": 4400.0 * b / 2, "trainable_params": 5242880, "trainable_dtype": "bfloat16",
                        "loss_first": 11.0, "loss_last": 10.0})
    return {
        "schema": _harness.SCHEMA, "date": "2099-01-01", "timestamp": "2099-01-01T00:00:00+00:00",
        "gpu": {"name": "Synthetic GPU", "short": "synthetic", "capability": "9.0", "sm_count": 132, "memory_MiB": 1},
        "versions": {"torch": "x"}, "git": {"commit": None},
        "sweep": {"name": "default", "partial": False, "complete": True, "cases": 48, "impls": list(_sweep.IMPLS),
                  "e2e_impls": list(_sweep.E2E_IMPLS), "selection": {}, "peft_adapter_dtype": "bf16"},
        "timing": {"layers": "synthetic", "e2e": "synthetic", "warmup_ms": 25, "rep_ms": 100, "min_samples": 10},
        "ceilings": {"bf16_gemm_8192_tflops": 780.0, "copy_tb_per_s": 4.27},
        "impls": {i: {"available": i != "torchao", "reason": None if i != "torchao" else "No module named 'torchao'"}
                  for i in _sweep.IMPLS},
        "layers": rows, "e2e": e2e, "durations_s": {"session": 1, "layers": 1, "e2e": 0, "estimate": 1},
    }


@check
def report_from_synthetic_rows():
    doc = synthetic_doc()
    with tempfile.TemporaryDirectory() as d:
        d = Path(d)
        jp = d / "2099-01-01-synthetic.json"
        jp.write_text(json.dumps(doc))
        loaded = report.load([jp])
        png = report.write_plot(loaded, d / "plot.png")
        assert png and Path(png).stat().st_size > 10_000
        md = report.render_markdown(loaded, json_path=jp, png_path=Path(png), md_path=d / "RESULTS.md")
        for needle in ("## Issue 5 targets", "## This harness vs the anchors", "## End-to-end training step",
                       "## Layers", "## Errors", "![speedup", "| 16384 |", "n/a", "error¹", "4096→14336"):
            assert needle in md, needle
        # CLI path: regenerate from the JSON into a chosen place
        assert report.main([str(jp), "--md", str(d / "cli.md"), "--png", str(d / "cli.png")]) == 0
        assert (d / "cli.md").read_text().startswith("# qlora_ext benchmark results")
        # merging two runs: later wins per cell
        doc2 = dict(doc, layers=[dict(doc["layers"][0], ms=123.0)], e2e=[])
        jp2 = d / "b.json"
        jp2.write_text(json.dumps(doc2))
        merged = report.load([jp, jp2])
        assert len(merged["layers"]) == len(doc["layers"]) and merged["layers"][0]["ms"] == 123.0
    t = {(x["target"], x["shape"], x["m"]): x for x in report.evaluate_targets(doc)}
    fwd = t[("forward ≤ 1.03× cuBLAS GEMM", "4096x14336", 2048)]
    assert fwd["verdict"] == "met" and abs(fwd["measured"] - 1.02) < 1e-9
    fb = t[("fwd+bwd ≥ 1.25× faster than bnb+PEFT", "4096x14336", 16384)]
    assert fb["verdict"] == "met"
    assert t[("fwd+bwd ≤ 1.05× two-GEMM floor", "8192x28672", 8192)]["verdict"] == "no data"
    decode = t[("decode forward ≤ 2× NF4 byte floor (ms)", "4096x14336", 16)]
    assert decode["verdict"] in ("met", "missed") and abs(decode["threshold"] - 0.0142) < 0.0002
    lines = report.terminal_table(doc["layers"], doc["e2e"])
    assert any("n/a" in ln for ln in lines) and any("ERR" in ln for ln in lines)
    anchors = report.load_anchors(report.find_anchors())
    if anchors["source"]:
        lay, e2e = report.anchor_comparison(doc, anchors)
        assert any(r["impl"] == "bnb_peft" and r["m"] == 2048 and "peft" in r["source"] for r in lay)
        assert any(r["impl"] == "cublas" for r in lay) and len(e2e) == 4
        return f"{len(md.splitlines())} markdown lines; anchors matched: {len(lay)} layer rows, {len(e2e)} e2e rows"
    return f"{len(md.splitlines())} markdown lines; anchors not found here"


@check
def session_output_paths_and_write():
    """BenchSession.write() with synthetic rows into an explicit directory; default paths without one."""
    opts = _harness.BenchOptions(sweep=_sweep.DEFAULT, cases=_sweep.DEFAULT.cases(), impls=_sweep.IMPLS,
                                 e2e=_sweep.DEFAULT.e2e, e2e_impls=_sweep.E2E_IMPLS)
    s = _harness.BenchSession(opts)
    doc = synthetic_doc()
    s.env = {"gpu": doc["gpu"], "versions": doc["versions"], "git": doc["git"]}
    s.impls = doc["impls"]
    s.layer_rows, s.e2e_rows = doc["layers"], doc["e2e"]
    p = s.output_paths(s.document(complete=True))
    assert p["md"] == _harness.BENCH_DIR / "RESULTS.md" and p["json"].parent == _harness.BENCH_DIR / "results"
    s.opts = dataclasses.replace(opts, partial=True)
    assert s.output_paths(s.document(complete=True))["json"].name.endswith("-partial.json")
    with tempfile.TemporaryDirectory() as d:
        s.opts = dataclasses.replace(opts, out_dir=Path(d))
        written = s.write(complete=True)
        names = sorted(x.name for x in Path(d).iterdir())
        assert names == sorted([Path(written["json"]).name, "RESULTS.md", Path(written["json"]).with_suffix(".png").name]), names
        back = json.loads(Path(written["json"]).read_text())
        assert back["schema"] == _harness.SCHEMA and len(back["layers"]) == len(doc["layers"])
    assert _harness.gpu_short_name("NVIDIA H200") == "h200"
    assert _harness.gpu_short_name("NVIDIA H100 80GB HBM3") == "h100-80gb-hbm3"
    return f"wrote {names}"


# ----------------------------------------------------------------------------------------------------------
# Dry run of the GPU code paths on the CPU: torch.cuda's timing / memory / sync calls faked, allocations on the
# CPU (bench._timing.DEVICE), triton's do_bench replaced by the suite's own event loop. Exercises the harness'
# control flow (sanity, timing, peak memory, error recording, broken-context handling, pytest plumbing, output
# writing); the numbers are meaningless.


class _FakeEvent:
    def __init__(self, enable_timing=False, **_):
        self.t = None

    def record(self, stream=None):
        self.t = time.perf_counter()

    def synchronize(self):
        pass

    def elapsed_time(self, end):
        return (end.t - self.t) * 1e3


class _FakeProps:
    name, major, minor, multi_processor_count, total_memory = "Fake CPU-as-GPU", 0, 0, 1, 2**30


def install_fake_cuda() -> dict:
    """Patch torch.cuda for the dry run; returns what was replaced (for restore_fake_cuda)."""
    import torch

    from . import _timing

    saved = {name: getattr(torch.cuda, name) for name in (
        "is_available", "synchronize", "Event", "memory_allocated", "max_memory_allocated", "reset_peak_memory_stats",
        "empty_cache", "get_device_properties")}
    saved["_timing.DEVICE"], saved["_timing._triton_do_bench"] = _timing.DEVICE, _timing._triton_do_bench
    saved["_timing._L2_FLUSH_BYTES"] = _timing._L2_FLUSH_BYTES
    torch.cuda.is_available = lambda: True
    torch.cuda.synchronize = lambda *a, **k: None
    torch.cuda.Event = _FakeEvent
    torch.cuda.memory_allocated = lambda *a, **k: 0
    torch.cuda.max_memory_allocated = lambda *a, **k: 0
    torch.cuda.reset_peak_memory_stats = lambda *a, **k: None
    torch.cuda.empty_cache = lambda: None
    torch.cuda.get_device_properties = lambda *a, **k: _FakeProps()
    _timing.DEVICE = "cpu"
    _timing._triton_do_bench = lambda: None
    _timing._L2_FLUSH_BYTES = 2**20  # zeroing 256 MB on a CPU per timed call would only slow the dry run
    return saved


def restore_fake_cuda(saved: dict) -> None:
    import torch

    from . import _timing

    _timing.DEVICE = saved.pop("_timing.DEVICE")
    _timing._triton_do_bench = saved.pop("_timing._triton_do_bench")
    _timing._L2_FLUSH_BYTES = saved.pop("_timing._L2_FLUSH_BYTES")
    for name, v in saved.items():
        setattr(torch.cuda, name, v)


@check
def harness_dry_run_cpu():
    """BenchSession.run_layer / run_e2e end to end on fake CUDA: ok rows, a failing baseline recorded without
    stopping the run, a lost CUDA context turning the rest into 'skipped', outputs written."""
    import torch

    from . import _impls

    saved = install_fake_cuda()
    tmp = tempfile.TemporaryDirectory()  # checkpoints and outputs go here, never into bench/results/
    try:
        tiny_e2e = _sweep.E2ESweep(batches=(2,), seq=16, layers=1, vocab=128, hidden=64, intermediate=128, heads=4,
                                   kv_heads=2, warmup_steps=1, timed_steps=2)
        cases = [_tiny_case(mode, p) for mode in _sweep.MODES for p in (0.0, 0.05)]
        opts = _harness.BenchOptions(sweep=_sweep.QUICK, cases=cases, impls=_sweep.IMPLS, e2e=tiny_e2e,
                                     e2e_impls=_sweep.E2E_IMPLS, out_dir=Path(tmp.name), warmup_ms=1, rep_ms=2,
                                     min_samples=3, measure_ceilings=False)
        s = _harness.BenchSession(opts)
        s.start()
        rows = [s.run_layer(c, i) for c in cases for i in _sweep.IMPLS]
        ok = [r for r in rows if r["status"] == "ok"]
        assert len(ok) >= 4 * 4, [(r["cell"], r["status"], r["reason"]) for r in rows if r["status"] != "ok"]
        assert all(r["samples"] >= 3 and r["timer"] == "cuda-events" and r["ms"] > 0 for r in ok)
        # a baseline that raises: recorded as an error, the next cell still runs
        real = _impls.BUILDERS["bf16_peft"]
        _impls.BUILDERS["bf16_peft"] = lambda ws, case: (_ for _ in ()).throw(RuntimeError("boom"))
        try:
            bad = s.run_layer(cases[0], "bf16_peft")
        finally:
            _impls.BUILDERS["bf16_peft"] = real
        assert bad["status"] == "error" and "boom" in bad["reason"] and not s.broken
        assert s.run_layer(cases[0], "cublas")["status"] == "ok"
        torch.cuda.is_available = saved["is_available"]  # else AdamW probes a CUDA graph capture on the CPU
        e2e_rows = [s.run_e2e(i, 2) for i in _sweep.E2E_IMPLS]
        torch.cuda.is_available = lambda: True
        assert all(r["status"] == "ok" and r["tokens_per_s"] > 0 for r in e2e_rows), e2e_rows
        # a sticky CUDA error: everything after it is skipped, not attempted
        torch.cuda.synchronize = lambda *a, **k: (_ for _ in ()).throw(RuntimeError("CUDA error: an illegal memory access"))
        broken = s.run_layer(cases[1], "cublas")
        assert broken["status"] == "error" and s.broken, broken
        torch.cuda.synchronize = lambda *a, **k: None
        after = s.run_layer(cases[2], "ours")
        assert after["status"] == "skipped" and "unusable" in after["reason"]
        written = s.write(complete=True)
        md = Path(written["md"]).read_text()
        assert "boom" in md and "## End-to-end training step" in md, md[:500]
        assert json.loads(Path(written["json"]).read_text())["sweep"]["complete"]
        return f"{len(ok)} ok layer rows, e2e {[r['impl'] for r in e2e_rows]}, error + broken-context paths"
    finally:
        restore_fake_cuda(saved)
        tmp.cleanup()


@check
def pytest_flow_dry_run_cpu():
    """`pytest bench/` itself on fake CUDA with a tiny selection: collection, fixtures, pytest-benchmark, output."""
    root = Path(__file__).resolve().parent.parent
    with tempfile.TemporaryDirectory() as d:
        (Path(d) / "fakecuda_plugin.py").write_text("from bench._selftest import install_fake_cuda\ninstall_fake_cuda()\n")
        out = Path(d) / "out"
        cmd = [sys.executable, "-m", "pytest", str(root / "bench"), "-p", "fakecuda_plugin", "-p", "no:cacheprovider",
               "-m", "layer", "--bench-shapes", "128x256", "--bench-m", "8", "--bench-r", "16", "--bench-dropout", "0,0.05",
               "--bench-no-ceilings", "--bench-out", str(out), "--bench-warmup-ms", "1", "--bench-rep-ms", "2",
               "--bench-min-samples", "3", "-rs"]
        import os

        env = {**os.environ, "PYTHONPATH": os.pathsep.join([d, str(root)] + ([os.environ["PYTHONPATH"]] if os.environ.get("PYTHONPATH") else []))}
        proc = subprocess.run(cmd, cwd=root, capture_output=True, text=True, timeout=600, env=env)
        text = proc.stdout + proc.stderr
        assert proc.returncode == 0, text[-4000:]
        for needle in ("qlora_ext bench: sweep default (selection)",
                       "128x256-m8-r16-p0-fwd+bwd-ours", "json:", "Mean", "median ms (CUDA events"):
            assert needle in text, (needle, text[-3000:])
        files = sorted(p.name for p in out.iterdir())
        assert any(f.endswith("-partial.json") for f in files) and "RESULTS.md" in files, files
        doc = json.loads(next(out.glob("*.json")).read_text())
        assert doc["sweep"]["partial"] and len(doc["layers"]) == 4 * len(_sweep.IMPLS)
        passed = text.strip().splitlines()[-1]
    return f"{passed.strip('= ')}; wrote {files}"


def main() -> int:
    failed = 0
    for fn in _CHECKS:
        t0 = time.time()
        try:
            msg = fn()
            print(f"ok    {fn.__name__} ({time.time() - t0:.1f} s){': ' + msg if msg else ''}")
        except Exception as e:
            failed += 1
            import traceback

            print(f"FAIL  {fn.__name__}: {type(e).__name__}: {e}")
            traceback.print_exc()
    print("all checks passed" if not failed else f"{failed} check(s) failed")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
