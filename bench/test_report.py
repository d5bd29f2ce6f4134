"""CPU checks of bench/'s pure-Python parts: the sweep and option parsing, RESULTS.md / PNG rendering and the policy
generator, on a synthetic results JSON whose best paths are known by construction."""

import json
import subprocess
import sys
from pathlib import Path

import pytest

from bench import _sweep, policy, report

PATHS = ("fused", "decode_gemm", "gemv")


def _times(col, shape, m):
    """(fwd ms, bwd ms) per 2**24 weight elements: gemv wins the forward at m <= 16 and has no backward, fused the
    backward there; at m = 2048 decode_gemm wins both for the large classes, fused for the small one. bnb+PEFT is
    slower than qlora_ext (= fused) everywhere but the small class's forward at m = 2048."""
    k, n = _sweep.kn(shape)
    small, big = n * k <= 2**25, m > 16
    t = {"qlora_ext[gemv]": (None, None) if big else (0.01, None),
         "qlora_ext[fused]": (0.5, 0.9) if big else (0.02, 0.03),
         "qlora_ext[decode_gemm]": ((0.6, 1.0) if small else (0.4, 0.7)) if big else (0.05, 0.08),
         "cublas": (0.3, 0.3) if big else (0.02, 0.02),
         "bnb_peft": (0.45 if small else 0.8, 1.5) if big else (0.05, 0.3),
         "bf16_peft": (0.4, 1.0) if big else (0.04, 0.25), "reference": (None, None) if big else (0.5, 1.0),
         "torchao": (None, None)}
    t["qlora_ext"] = t["qlora_ext[fused]"]
    return tuple(None if v is None else v * n * k / 2**24 for v in t[col])


def synthetic_doc() -> dict:
    cells, cols = [], _sweep.columns(PATHS)
    for c in _sweep.plan(("4096x4096", "4096x14336", "14336x4096"), (1, 16, 2048), (16, 64), _sweep.MODES, cols):
        (k, n), (f, b) = _sweep.kn(c.shape), _times(c.column, c.shape, c.m)
        ms = f if c.mode == "fwd" else (f + b if f is not None and b is not None else None)
        row = {"shape": c.shape, "k": k, "n": n, "m": c.m, "r": c.r, "mode": c.mode, "implementation": c.column,
               "status": "skipped", "reason": "ImportError: no torchao" if c.column == "torchao" else "not served here"}
        if ms is not None:
            ms *= 1.1 if c.r == 64 else 1.0
            row.update(status="ok", reason=None, median_ms=ms, spread=0.15 if c.column == "bf16_peft" else 0.02,
                       samples=60, repeat_ms=[ms] * 3, host_ms=0.02, host_bound=c.column == "bnb_peft" and c.m <= 16,
                       peak_extra_mib=2.0 * c.m * n / 2**20, **({"workspace_mib": 8.0} if "qlora" in c.column else {}))
            if c.mode == "fwd" and c.m <= 16 and c.column in ("cublas", "qlora_ext"):  # replays: qlora_ext at 1.5x
                row["graph_ms"] = ms / (3 if c.column == "cublas" else 2)
        cells.append(row)
    cells.append({**cells[-1], "implementation": "bf16_peft", "status": "error", "reason": "RuntimeError: boom"})
    e2e = [{"implementation": c, "batch": 2, "layers": 4, "seq": 2048, "vocab": 32000, "r": 16, "status": "ok",
            "step_ms": t, "tokens_per_s": 4096 / t * 1e3, "peak_extra_mib": 4000.0, "weights_mib": 900.0}
           for c, t in (("qlora_ext", 60.0), ("bnb_peft", 45.0), ("bf16_peft", 40.0))]
    return {"schema": "qlora_ext-bench/2", "date": "2026-12-01", "timestamp": "2026-12-01T10:00:00+00:00",
            "gpu": {"name": "NVIDIA H200", "short": "h200", "capability": "9.0", "sm_count": 132, "memory_gib": 139.8},
            "versions": {"torch": "2.14.1"}, "git": {"commit": "0" * 40},
            "ceilings": {"bf16_gemm_tflops": 700.0, "copy_tb_s": 4.2},
            "run": {"full": True, "complete": True, "command": "pytest bench/", "columns": cols, "elapsed_s": 1.0},
            "timing": {}, "columns": {"torchao": "ImportError: no torchao"}, "cells": cells, "e2e": e2e}


@pytest.fixture
def synth(tmp_path) -> Path:
    path = tmp_path / "2026-12-01-h200.json"
    path.write_text(json.dumps(synthetic_doc()))
    return path


def test_sweep_and_options():
    assert len(_sweep.plan(_sweep.SHAPES, _sweep.M, _sweep.R, _sweep.MODES, _sweep.columns(PATHS))) == 7 * 6 * 2 * 2 * 9
    assert _sweep.parse("4096->14336, 70b", "--bench-shapes", "shapes") == (
        "4096x14336", "8192x8192", "8192x28672", "28672x8192")
    assert _sweep.parse("16,1,16", "--bench-m") == (16, 1)
    assert _sweep.path_of("qlora_ext[decode_gemm]") == "decode_gemm" and _sweep.path_of("qlora_ext") is None
    for text, known in (("4096", "shapes"), ("0", None), ("bwd", _sweep.MODES)):
        with pytest.raises(ValueError, match="--bench-x: expected"):
            _sweep.parse(text, "--bench-x", known)


def test_shape_class_and_buckets():
    assert [policy.shape_class(*_sweep.kn(s)[::-1]) for s in _sweep.SHAPES] == [
        "small", "small", "expand", "reduce", "expand", "expand", "reduce"]
    assert policy.buckets(_sweep.M) == [(1, 4), (16, 45), (128, 512), (2048, 4096), (8192, 11585), (16384, None)]


def test_policy(synth, tmp_path, capsys):
    out = tmp_path / "t.json"
    assert policy.main([str(synth), "--out", str(out)]) == 0
    table = json.loads(out.read_text())
    assert list(table) == ["source", "gpu", "generated", "command", "note", "rules"]
    got = {(r["cc"], r["shape_class"], r["m_max"]): (r["fwd"], r["bwd"]) for r in table["rules"]}
    for cc in ("9.0", "*"):
        for cls in ("small", "expand", "reduce"):
            assert got[(cc, cls, 4)] == got[(cc, cls, 181)] == ("gemv", "fused")
            assert got[(cc, cls, None)] == (("fused", "fused") if cls == "small" else ("decode_gemm", "decode_gemm"))
    assert len(got) == 18 and all(r["dtype"] == "*" and r["why"] and r["bwd"] != "gemv" for r in table["rules"])
    err = capsys.readouterr().err
    assert "SLOWER than bnb+PEFT in 2 measured cells" in err and "4096x4096 m=2048 r=64 fwd" in err


def test_policy_prefers_a_path_that_never_loses_to_bnb_peft():
    # a is the better path by its worst ratio to the fastest (1.05x vs 1.2x) but slower than bnb+PEFT in one cell
    keys = [("4096x14336", 4096, 14336, 2048, 16), ("4096x14336", 4096, 14336, 2048, 64)]
    figs = {keys[0]: {"qlora_ext[a]": {"fwd": 1.05}, "qlora_ext[b]": {"fwd": 1.0}, "bnb_peft": {"fwd": 1.02}},
            keys[1]: {"qlora_ext[a]": {"fwd": 1.0}, "qlora_ext[b]": {"fwd": 1.2}, "bnb_peft": {"fwd": 2.0}}}
    assert policy._choose(figs, set(), keys, ["a", "b"], "fwd")[0] == "b"
    figs[keys[0]]["bnb_peft"]["fwd"] = 1.1  # now neither loses: the worst ratio decides
    assert policy._choose(figs, set(), keys, ["a", "b"], "fwd")[0] == "a"


def test_policy_rows_for_unmeasured_gpus_never_name_sm90():
    """sm90 exists on compute capability 9.0 only: it may win the measured GPU's rows, never the "*" rows."""
    doc = synthetic_doc()
    doc["cells"] += [{**c, "implementation": "qlora_ext[sm90]", "median_ms": c["median_ms"] / 10}
                     for c in doc["cells"] if c["implementation"] == "qlora_ext[fused]" and c["status"] == "ok"
                     and c["mode"] == "fwd" and c["m"] == 2048]
    rules, _, _ = policy.generate(doc)
    assert {r["fwd"] for r in rules if r["cc"] == "9.0" and r["m_max"] is None} == {"sm90"}
    assert all("sm90" not in (r["fwd"], r["bwd"]) for r in rules if r["cc"] == "*")
    assert all(r["bwd"] != "sm90" for r in rules)


def test_report(synth, tmp_path):
    results = tmp_path / "RESULTS.md"
    assert str(results) in report.write(report.load(synth), synth, results_md=str(results))
    md = results.read_text()
    assert (tmp_path / "2026-12-01-h200.md").read_text() == md
    assert "qlora_ext (auto dispatch) ≤ bnb+PEFT in **34 of 36** cells" in md
    assert "  - 4096x4096: fwd m=2048 r=16 1.11×, fwd m=2048 r=64 1.11×" in md
    assert "| qlora_ext ÷ bnb+PEFT | qlora_ext ÷ cuBLAS |" in md and "Host-bound cells (†): 24 of" in md
    assert "| bnb+PEFT | 2 | 45.0 | 91,022 | 1.33 |" in md and "RuntimeError: boom" in md and "workspace" in md
    assert "/tmp" not in md and "issue" not in md.lower()
    assert "Small-m forward, GPU time of CUDA-graph replays: qlora_ext ≤ cuBLAS bf16 in 0 of 12 cells" in md
    assert "## Cells under CUDA graphs (small m, short and host-bound calls)" in md and "| 4096→4096 | 1 | 16 | fwd | " in md and " | 1.50 |" in md
    pytest.importorskip("matplotlib")
    assert (tmp_path / "2026-12-01-h200.png").stat().st_size > 10_000


def test_versus_cublas_uses_graph_times_where_both_have_them():
    def cell(impl, m, mode, ms, graph=None):
        return {"shape": "4096x4096", "m": m, "r": 16, "mode": mode, "implementation": impl, "status": "ok",
                "median_ms": ms, **({"graph_ms": graph} if graph is not None else {})}
    doc = {"cells": [cell("qlora_ext", 2048, "fwd", 0.3, 0.1), cell("cublas", 2048, "fwd", 0.1, 0.1),  # host-bound
                     cell("qlora_ext", 8192, "fwd", 1.2), cell("cublas", 8192, "fwd", 1.0, 0.9),  # one replay only
                     cell("qlora_ext", 16, "fwd", 0.05, 0.01), cell("cublas", 16, "fwd", 0.02, 0.02),  # small m
                     cell("qlora_ext", 2048, "fwd+bwd", 0.5), cell("cublas", 2048, "fwd+bwd", 0.5)]}
    got = {mode: sorted(r for _, r in v) for mode, v in report.versus_cublas(doc).items()}
    assert got == {"fwd": [1.0, pytest.approx(1.2)], "fwd+bwd": [1.0]}
    assert "m ≥ 2048, fwd, qlora_ext ÷ cuBLAS bf16 (graph replays where both have one): ≤ 1.05× in 1 of 2 cells" in (
        "\n".join(report._summary({**doc, "cells": [{**c, "host_bound": False} for c in doc["cells"]]})))


def test_versus_bnb_judges_gpu_time_and_in_host_bound_rows_the_slower_of_host_and_gpu():
    def cell(impl, m, ms, graph=None, host=0.01, hb=False):
        return {"shape": "4096x4096", "m": m, "r": 16, "mode": "fwd", "implementation": impl, "status": "ok",
                "median_ms": ms, "host_ms": host, "host_bound": hb, **({"graph_ms": graph} if graph else {})}
    doc = {"cells": [cell("qlora_ext", 1, 0.3, 0.03, 0.2, True), cell("bnb_peft", 1, 0.1, 0.05, 0.4, True),
                     cell("qlora_ext", 16, 0.1, 0.03, 0.5, True), cell("bnb_peft", 16, 0.2, 0.05, 0.4, True),
                     cell("qlora_ext", 2048, 1.0), cell("bnb_peft", 2048, 0.9, 0.1)]}  # one replay: medians
    le, slower = report.versus_bnb(doc)  # m=1: max(0.2, 0.03) / max(0.4, 0.05); m=16: 0.5 / 0.4
    assert le == 1 and [(k[1], round(x, 3), hb) for k, x, hb in slower] == [(16, 1.25, True), (2048, 1.111, False)]


def test_policy_judges_on_replays_where_every_path_and_bnb_have_one():
    def cell(impl, m, ms, graph=None, hb=False):
        return {"shape": "4096x4096", "k": 4096, "n": 4096, "m": m, "r": 16, "mode": "fwd", "implementation": impl,
                "status": "ok", "median_ms": ms, "host_bound": hb, **({"graph_ms": graph} if graph else {})}
    policy.HOST_BOUND.clear()
    doc = {"cells": [cell("qlora_ext[a]", 128, 0.1, 0.1), cell("qlora_ext[b]", 128, 0.3, 0.04, True),
                     cell("bnb_peft", 128, 0.06, 0.05, True),
                     cell("qlora_ext[a]", 2048, 0.5), cell("qlora_ext[b]", 2048, 0.6, 0.2, True),
                     cell("bnb_peft", 2048, 0.9)]}
    figs, _, _ = policy._collect(doc)
    key = ("4096x4096", 4096, 4096, 128, 16)
    assert {i: f["fwd"] for i, f in figs[key].items()} == {"qlora_ext[a]": 0.1, "qlora_ext[b]": 0.04, "bnb_peft": 0.05}
    assert (key, "qlora_ext[b]", "fwd") not in policy.HOST_BOUND
    assert figs[(*key[:3], 2048, 16)]["qlora_ext[b]"]["fwd"] == 0.6  # a has no replay there: event medians
    assert policy._choose(figs, set(), [key], ["a", "b"], "fwd")[0] == "b"


def test_command_line(synth, tmp_path):
    for args in (["bench.report", str(synth), "--results-md", "none"],
                 ["bench.policy", str(synth), "--out", str(tmp_path / "p.json")]):
        done = subprocess.run([sys.executable, "-m", *args], cwd=Path(__file__).parent.parent, capture_output=True,
                              text=True)
        assert done.returncode == 0, done.stderr


def test_earlier_results_render(tmp_path):
    """A run recorded by the earlier harness (bench/results/, read only) renders in today's format."""
    old = Path(__file__).resolve().parent / "results" / "2026-11-29-h200.json"
    if not old.exists():
        pytest.skip("no earlier run in bench/results/")
    md = report.render(report.load(old), old, None, tmp_path)
    assert "| 2048 | 16 | fwd+bwd |" in md and "Host-bound cells: not recorded" in md
