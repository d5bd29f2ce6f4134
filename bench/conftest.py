"""pytest plumbing for bench/: options, the parametrized sweep, the session harness, results at session end.

    pytest bench/                     default sweep (~4 min on an H200), results in bench/results/ + bench/RESULTS.md
    pytest bench/ --bench-quick       smoke subset (~30-45 s)
    pytest bench/ --bench-full        the whole issue-4 sweep (~9-10 min)
    pytest bench/ --bench-shapes 8192x28672 --bench-m 2048,16384 --bench-modes fwd+bwd --bench-impls cublas,ours,bnb_peft
    pytest bench/ -m e2e              only the end-to-end training step (-m layer: only the layer sweep)

Without CUDA every item skips with one reason. See bench/README.md.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest

try:
    from bench import _harness, _sweep, _timing
except ImportError:  # rootdir-less invocations (e.g. --import-mode=importlib): import the package by path
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from bench import _harness, _sweep, _timing

NO_CUDA_ID = "cuda-unavailable"
_SELECTION = ("bench_shapes", "bench_m", "bench_r", "bench_dropout", "bench_modes", "bench_impls", "bench_e2e_impls",
              "bench_e2e_batch", "bench_e2e_layers", "bench_e2e_vocab", "bench_e2e_seq", "bench_e2e_steps")


def pytest_addoption(parser):
    g = parser.getgroup("qlora_ext bench", "qlora_ext benchmarks (bench/, see bench/README.md)")
    g.addoption("--bench-quick", action="store_true", help="smoke subset: 4096x14336, m 16 and 2048, r=16, short timing, 2-layer e2e at batch 2")
    g.addoption("--bench-full", action="store_true", help="the whole sweep: 7 shapes x 6 m x r {16,64} x dropout {0,0.05} x {fwd, fwd+bwd}")
    g.addoption("--bench-shapes", metavar="LIST", help="KxN (in x out) list, or 8b / 70b / targets / all")
    g.addoption("--bench-m", metavar="LIST", help="token counts, e.g. 1,16,2048")
    g.addoption("--bench-r", metavar="LIST", help="LoRA ranks, e.g. 16,64")
    g.addoption("--bench-dropout", metavar="LIST", help="lora_dropout values, e.g. 0,0.05")
    g.addoption("--bench-modes", metavar="LIST", help="fwd and/or fwd+bwd")
    g.addoption("--bench-impls", metavar="LIST", help=f"layer implementations ({','.join(_sweep.IMPLS)})")
    g.addoption("--bench-e2e-impls", metavar="LIST", help=f"e2e implementations ({','.join(_sweep.E2E_IMPLS)})")
    g.addoption("--bench-e2e-batch", metavar="LIST", help="e2e batch sizes (default 2,8)")
    g.addoption("--bench-e2e-layers", type=int, metavar="N", help="e2e decoder layers (default 4)")
    g.addoption("--bench-e2e-vocab", type=int, metavar="N", help="e2e vocabulary (default 32000 as the anchors; Llama-3: 128256)")
    g.addoption("--bench-e2e-seq", type=int, metavar="N", help="e2e sequence length (default 2048)")
    g.addoption("--bench-e2e-steps", type=int, metavar="N", help="e2e timed steps after the warm-up ones (default 7)")
    g.addoption("--bench-out", metavar="DIR", help=f"write JSON, PNG and RESULTS.md into DIR (env {_harness.ENV_OUT})")
    g.addoption("--bench-tag", metavar="TAG", help="suffix for the output file names (<date>-<gpu>-TAG.json)")
    g.addoption("--bench-warmup-ms", type=float, metavar="MS", help="do_bench warm-up per cell (default 25; quick 10)")
    g.addoption("--bench-rep-ms", type=float, metavar="MS", help="do_bench timed span per cell (default 100; quick 25)")
    g.addoption("--bench-min-samples", type=int, metavar="N", help="at least N timed calls per cell (default 10)")
    g.addoption("--bench-peft-adapter-dtype", choices=("bf16", "fp32"), default="bf16",
                help="PEFT lora_A/lora_B dtype: bf16 (as qlora_ext and the anchors) or fp32 (PEFT's autocast default)")
    g.addoption("--bench-fwd-grad", action="store_true",
                help="time mode fwd with autograd recording (training forward) instead of under torch.no_grad()")
    g.addoption("--bench-no-ceilings", action="store_true", help="skip measuring the GEMM / copy ceilings at start")


@dataclasses.dataclass
class _State:
    opts: _harness.BenchOptions
    no_cuda_reason: str | None
    session: _harness.BenchSession
    layer_cells: dict
    e2e_cells: dict
    written: dict | None = None


def _cuda_reason() -> str | None:
    try:
        import torch
    except Exception as e:
        return f"torch is not importable ({type(e).__name__}: {e}); the qlora_ext benchmarks time CUDA kernels"
    if torch.cuda.is_available():
        return None
    build = "a CPU-only torch build" if torch.version.cuda is None else f"torch {torch.__version__} sees no GPU"
    return (f"CUDA is not available ({build}): the qlora_ext benchmarks time CUDA kernels on a GPU; "
            "run `pytest bench/` on a CUDA machine")


def _options(config) -> _harness.BenchOptions:
    opt = config.getoption
    if opt("bench_quick") and opt("bench_full"):
        raise pytest.UsageError("--bench-quick and --bench-full exclude each other")
    sweep = _sweep.QUICK if opt("bench_quick") else _sweep.FULL if opt("bench_full") else _sweep.DEFAULT
    try:
        cases = _sweep.select(
            sweep,
            shapes=_sweep.parse_shapes(opt("bench_shapes")) if opt("bench_shapes") else None,
            ms=_sweep.parse_ints(opt("bench_m"), "--bench-m") if opt("bench_m") else None,
            rs=_sweep.parse_ints(opt("bench_r"), "--bench-r") if opt("bench_r") else None,
            dropouts=_sweep.parse_floats(opt("bench_dropout"), "--bench-dropout") if opt("bench_dropout") else None,
            modes=_sweep.parse_modes(opt("bench_modes")) if opt("bench_modes") else None,
        )
        impls = _sweep.parse_impls(opt("bench_impls")) if opt("bench_impls") else _sweep.IMPLS
        e2e_impls = (_sweep.parse_impls(opt("bench_e2e_impls"), _sweep.E2E_IMPLS, "--bench-e2e-impls")
                     if opt("bench_e2e_impls") else _sweep.E2E_IMPLS)
        e2e = sweep.e2e
        if opt("bench_e2e_batch"):
            e2e = dataclasses.replace(e2e, batches=_sweep.parse_ints(opt("bench_e2e_batch"), "--bench-e2e-batch"))
        for name, field in (("bench_e2e_layers", "layers"), ("bench_e2e_vocab", "vocab"), ("bench_e2e_seq", "seq"),
                            ("bench_e2e_steps", "timed_steps")):
            if opt(name) is not None:
                if opt(name) < 1:
                    raise ValueError(f"--{name.replace('_', '-')} must be >= 1")
                e2e = dataclasses.replace(e2e, **{field: opt(name)})
    except ValueError as e:
        raise pytest.UsageError(str(e)) from None

    selection = {k: opt(k) for k in _SELECTION if opt(k) not in (None, False)}
    if opt("bench_peft_adapter_dtype") != "bf16":
        selection["bench_peft_adapter_dtype"] = opt("bench_peft_adapter_dtype")
    if opt("bench_fwd_grad"):
        selection["bench_fwd_grad"] = True
    bench_dir = Path(__file__).resolve().parent
    narrowed = any(Path(a.split("::")[0]).resolve() != bench_dir for a in config.args)
    filtered = bool(config.option.keyword or config.option.markexpr)
    out = opt("bench_out")
    return _harness.BenchOptions(
        sweep=sweep,
        cases=cases,
        impls=impls,
        e2e=e2e,
        e2e_impls=e2e_impls,
        out_dir=Path(out) if out else None,
        tag=opt("bench_tag"),
        partial=bool(selection) or narrowed or filtered,
        adapter_dtype=opt("bench_peft_adapter_dtype"),
        fwd_grad=opt("bench_fwd_grad"),
        warmup_ms=opt("bench_warmup_ms") or sweep.warmup_ms,
        rep_ms=opt("bench_rep_ms") or sweep.rep_ms,
        min_samples=opt("bench_min_samples") or sweep.min_samples,
        measure_ceilings=not opt("bench_no_ceilings"),
        selection=selection,
    )


class _NoBenchmarkPlugin:
    """Stands in for pytest-benchmark when it is not installed (or disabled): results still go to the JSON."""

    @pytest.fixture
    def benchmark(self):
        return None


def pytest_configure(config):
    for line in (
        "layer: a layer benchmark cell (bench/test_layers.py)",
        "e2e: an end-to-end training-step benchmark (bench/test_e2e.py)",
        "benchmark: pytest-benchmark settings (bench/ sets its GPU-time timer and group)",
    ):
        config.addinivalue_line("markers", line)
    # error cells fail before using the fixture; pytest-benchmark would add a warning to the failure
    config.addinivalue_line("filterwarnings", "ignore:Benchmark fixture was not used")
    if not config.pluginmanager.has_plugin("benchmark"):
        config.pluginmanager.register(_NoBenchmarkPlugin(), "qlora-bench-no-pytest-benchmark")
    opts = _options(config)
    reason = _cuda_reason()
    layer_cells = {c.cell_id(i): (c, i) for c in opts.cases for i in opts.impls}
    e2e_cells = {f"e2e-b{b}-{i}": (i, b) for i in opts.e2e_impls for b in opts.e2e.batches}
    config._qlora_bench = _State(opts, reason, _harness.BenchSession(opts), layer_cells, e2e_cells)


def _state(config) -> _State:
    return config._qlora_bench


def pytest_generate_tests(metafunc):
    st = _state(metafunc.config)
    timer_mark = dict(timer=_timing.gpu_time_clock)
    if "layer_cell" in metafunc.fixturenames:
        if st.no_cuda_reason:
            params = [pytest.param(NO_CUDA_ID, id=NO_CUDA_ID)]
        else:
            params = [
                pytest.param(cid, id=cid, marks=pytest.mark.benchmark(group=case.id, **timer_mark))
                for cid, (case, _impl) in st.layer_cells.items()
            ]
        metafunc.parametrize("layer_cell", params)
    if "e2e_cell" in metafunc.fixturenames:
        if st.no_cuda_reason:
            params = [pytest.param(NO_CUDA_ID, id=NO_CUDA_ID)]
        else:
            params = [
                pytest.param(cid, id=cid, marks=pytest.mark.benchmark(group=f"e2e batch={b}", **timer_mark))
                for cid, (_impl, b) in st.e2e_cells.items()
            ]
        metafunc.parametrize("e2e_cell", params)


def pytest_collection_modifyitems(config, items):
    # layer cells first (a shape's weights are built once and freed), then the end-to-end models
    items.sort(key=lambda it: 1 if it.get_closest_marker("e2e") else 0)
    if _state(config).no_cuda_reason:
        # one placeholder item per test function was generated; keep one, so the run reports one skip, one reason
        del items[1:]


def pytest_report_header(config):
    st = _state(config)
    if st.no_cuda_reason:
        return [f"qlora_ext bench: every benchmark skips -- {st.no_cuda_reason}"]
    o = st.opts
    est = o.estimate()
    return [
        f"qlora_ext bench: sweep {o.sweep.name}{' (selection)' if o.selection else ''}: {len(o.cases)} layer cases x "
        f"{len(o.impls)} implementations + {len(st.e2e_cells)} e2e cells; estimated {est['total_s'] / 60:.1f} min on an H200 "
        f"(layers {est['layers_s']:.0f} s, setup {est['setup_s']:.0f} s, e2e {est['e2e_s']:.0f} s)",
        "qlora_ext bench: pytest-benchmark figures are GPU time (CUDA events, L2 flushed), see bench/README.md",
    ]


@pytest.fixture(scope="session")
def bench_session(request):
    st = _state(request.config)
    if st.no_cuda_reason:
        pytest.skip(st.no_cuda_reason)
    st.session.start()
    yield st.session
    st.session.release()


@pytest.fixture
def layer_case(layer_cell, request):
    return _state(request.config).layer_cells[layer_cell]


@pytest.fixture
def e2e_case(e2e_cell, request):
    return _state(request.config).e2e_cells[e2e_cell]


def pytest_sessionfinish(session, exitstatus):
    st = getattr(session.config, "_qlora_bench", None)
    if st is None or not st.session.started or not (st.session.layer_rows or st.session.e2e_rows):
        return
    complete = exitstatus not in (pytest.ExitCode.INTERRUPTED, pytest.ExitCode.INTERNAL_ERROR)
    st.written = st.session.write(complete=complete)


@pytest.hookimpl(trylast=True)  # after pytest-benchmark's tables: the compact table and the paths end the output
def pytest_terminal_summary(terminalreporter, exitstatus, config):
    st = getattr(config, "_qlora_bench", None)
    if st is None or not st.session.started:
        return
    tr = terminalreporter
    tr.section("qlora_ext bench")
    for line in st.session.summary_lines():
        tr.write_line(line)
    if st.written:
        tr.write_line("")
        for kind, path in st.written.items():
            tr.write_line(f"{kind:>4}: {path}")
    d = st.session.document(complete=True)["durations_s"]
    tr.write_line(f"time: session {d['session']} s (layers {d['layers']} s, e2e {d['e2e']} s; estimated {d['estimate']} s)")
    if os.environ.get(_harness.ENV_OUT) and not st.opts.out_dir:
        tr.write_line(f"(output directory from ${_harness.ENV_OUT})")
