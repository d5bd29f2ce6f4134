"""pytest plumbing for bench/ (bench/README.md): options, one test item per cell, the session and its output.
Without CUDA every GPU item skips with one reason; bench/test_report.py (CPU) still runs."""

from __future__ import annotations

import collections
import os
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

try:
    from bench import _e2e, _harness, _sweep, report
except ImportError:  # invoked without the repository root on sys.path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import _e2e, _harness, _sweep, report

_NARROWING = ("bench_shapes", "bench_m", "bench_r", "bench_modes", "bench_cols", "bench_e2e_batch", "bench_e2e_layers")


def pytest_addoption(parser):
    g = parser.getgroup("qlora_ext bench", "qlora_ext benchmarks (bench/README.md)")
    g.addoption("--bench-quick", action="store_true",
                help="smoke subset: 4096x14336, m 16 and 2048, r 16; a 2-layer e2e at batch 2")
    g.addoption("--bench-shapes", metavar="LIST", help="KxN (in x out) list, or 8b / 70b / all (default: all 7)")
    g.addoption("--bench-m", metavar="LIST", help="token counts (default 1,16,128,2048,8192,16384)")
    g.addoption("--bench-r", metavar="LIST", help="LoRA ranks (default 16,64)")
    g.addoption("--bench-modes", metavar="LIST", help="fwd and/or fwd+bwd (default both)")
    g.addoption("--bench-cols", metavar="LIST", help="columns: cublas, qlora_ext, qlora_ext[<path>] ('paths': all "
                "of them), reference, bnb_peft, bf16_peft, torchao; e2e runs the named ones of qlora_ext, bnb_peft, "
                "bf16_peft")
    g.addoption("--bench-e2e-batch", metavar="LIST", help="e2e batch sizes (default 2,8)")
    g.addoption("--bench-e2e-layers", type=int, metavar="N", help="e2e decoder layers (default 4)")
    g.addoption("--bench-out", metavar="DIR", help="where <date>-<gpu>.json/.md/.png go (default bench/results/)")
    g.addoption("--bench-tag", metavar="TAG", help="file names <date>-<gpu>-TAG.* (narrowed runs default to -partial)")


def _no_cuda_reason() -> str | None:
    try:
        import torch
    except Exception as e:  # noqa: BLE001
        return f"torch is not importable ({e}): the qlora_ext benchmarks time CUDA kernels"
    if not torch.cuda.is_available():
        return "CUDA is not available: the qlora_ext benchmarks time CUDA kernels; run `pytest bench/` on a GPU machine"
    return None


def _no_abs(arg: str) -> str:
    """An argument for the record: absolute paths become repository-relative, or <dir> outside the repository."""
    head, _, path = arg.rpartition("=")
    if not Path(path).is_absolute():
        return arg
    rel = os.path.relpath(path, Path(__file__).resolve().parent.parent)
    return (f"{head}=" if head else "") + ("<dir>" if rel.startswith("..") else rel)


def _options(config, no_cuda: bool) -> SimpleNamespace:
    opt, q, quick = config.getoption, _sweep.QUICK, config.getoption("bench_quick")
    paths = _sweep.PATHS_FALLBACK
    if not no_cuda:
        try:
            from qlora_ext.policy import PATHS as paths
        except Exception:  # qlora_ext.policy not importable: the path columns skip, naming the import error
            pass
    known = _sweep.columns(paths)
    try:
        def axis(name, option, default, known=None):
            return _sweep.parse(opt(name), option, known) if opt(name) else default

        text = opt("bench_cols") and ",".join(",".join(known[2:2 + len(paths)]) if t.strip() == "paths" else t
                                               for t in opt("bench_cols").split(","))
        named = _sweep.parse(text, "--bench-cols", known) if text else None
        o = SimpleNamespace(
            shapes=axis("bench_shapes", "--bench-shapes", q["shapes"] if quick else tuple(_sweep.SHAPES), "shapes"),
            ms=axis("bench_m", "--bench-m", q["m"] if quick else _sweep.M),
            rs=axis("bench_r", "--bench-r", q["r"] if quick else _sweep.R),
            modes=axis("bench_modes", "--bench-modes", _sweep.MODES, _sweep.MODES),
            e2e_batches=axis("bench_e2e_batch", "--bench-e2e-batch", q["e2e_batch"] if quick else (2, 8)))
        layers = opt("bench_e2e_layers") or (q["e2e_layers"] if quick else 4)
        if layers < 1:
            raise ValueError("--bench-e2e-layers must be >= 1")
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None
    bench_dir = Path(__file__).resolve().parent
    whole = all(Path(a.split("::")[0]).resolve() == bench_dir for a in config.args)
    narrowed = quick or any(opt(k) for k in _NARROWING) or config.option.keyword or config.option.markexpr or not whole

    def log(text: str) -> None:  # the terminal reporter registers after this hook: look it up when writing
        tr = config.pluginmanager.get_plugin("terminalreporter")
        tr.write_line(text) if tr else print(text)

    o.__dict__.update(
        cols=tuple(c for c in known if named is None or c in named),
        e2e_cols=tuple(c for c in _sweep.E2E_COLUMNS if named is None or c in named),
        e2e=_e2e.E2E(layers=layers, **({"warmup_steps": 2, "timed_steps": 3} if quick else {})),
        reference_all_m=named is not None and "reference" in named, full=not narrowed,
        tag=opt("bench_tag") or ("quick" if quick else None), out_dir=opt("bench_out") and Path(opt("bench_out")),
        command="pytest " + " ".join(map(_no_abs, config.invocation_params.args)), log=log)
    return o


def pytest_configure(config):
    for line in ("layer: a layer benchmark cell", "e2e: an end-to-end training-step benchmark"):
        config.addinivalue_line("markers", line)
    config.addinivalue_line("filterwarnings", "ignore:Benchmark fixture was not used")
    no_cuda = _no_cuda_reason()
    o = _options(config, no_cuda is not None)
    config._qlora_bench = SimpleNamespace(
        no_cuda=no_cuda, bench=_harness.Bench(o), doc=None, written=[], expected=None,
        cells=_sweep.plan(o.shapes, o.ms, o.rs, o.modes, o.cols),
        e2e_cells=[(c, b) for c in o.e2e_cols for b in o.e2e_batches])


def pytest_generate_tests(metafunc):
    st = metafunc.config._qlora_bench
    for name, cells, param in (
        ("layer_cell", st.cells, lambda c: pytest.param(c, id=c.id, marks=pytest.mark.benchmark(group=c.row))),
        ("e2e_cell", st.e2e_cells, lambda c: pytest.param(c, id=f"{c[0]}-b{c[1]}",
                                                            marks=pytest.mark.benchmark(group=f"e2e batch {c[1]}"))),
    ):
        if name in metafunc.fixturenames:
            metafunc.parametrize(name, [pytest.param(None, id="no-cuda")] if st.no_cuda else [param(c) for c in cells])


def pytest_collection_modifyitems(config, items):
    gpu = [it for it in items if it.get_closest_marker("layer") or it.get_closest_marker("e2e")]
    if config._qlora_bench.no_cuda:  # one placeholder item, one skip, one reason
        drop = set(map(id, gpu[1:]))
        items[:] = [it for it in items if id(it) not in drop]
    # CPU tests first, then the layers (one shape at a time, freed after it), then the training steps
    items.sort(key=lambda it: 2 if it.get_closest_marker("e2e") else 1 if it.get_closest_marker("layer") else 0)


def pytest_collection_finish(session):
    st = session.config._qlora_bench  # what runs after -m / -k: a run is complete when all of it did
    st.expected = tuple(sum(bool(it.get_closest_marker(m)) for it in session.items) for m in ("layer", "e2e"))
    # Columns per row among the items that run: a row is timed side by side once its last one is built.
    rows = [it.callspec.params["layer_cell"] for it in session.items if it.get_closest_marker("layer")
            and getattr(it, "callspec", None) and it.callspec.params.get("layer_cell") is not None]
    st.bench.row_sizes = dict(collections.Counter(c.row for c in rows))


@pytest.fixture(scope="session")
def bench(request):
    st = request.config._qlora_bench
    if st.no_cuda:
        pytest.skip(st.no_cuda)
    if not st.bench.started:
        st.bench.start()
    yield st.bench
    st.bench.release()


def pytest_sessionfinish(session, exitstatus):
    st = getattr(session.config, "_qlora_bench", None)
    if st is not None and st.bench.started and (st.bench.cells or st.bench.e2e):
        b = st.bench
        st.doc, st.written = b.write(complete=(len(b.cells), len(b.e2e)) == st.expected)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables: the summary and the paths end the output
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    st = getattr(config, "_qlora_bench", None)
    if st is not None and st.doc is not None:
        terminalreporter.section("qlora_ext bench")
        for line in report.summary_lines(st.doc) + [f"wrote {p}" for p in st.written]:
            terminalreporter.write_line(line)
