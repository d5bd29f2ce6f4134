"""CPU checks of the side-by-side timing of a row's columns (bench/_timing.gpu_times, bench/_harness.Bench): the
order of the repeats, the rounds and what a failing column does, with do_bench replaced by a recorder."""

import contextlib
from types import SimpleNamespace

from bench import _harness, _impls, _sweep, _timing


def _recorder(monkeypatch, fail=()):
    log = []

    def do_bench(fn, warmup_ms, rep_ms, grads):
        log.append((fn.__name__, warmup_ms > 0))
        if fn.__name__ in fail:
            raise RuntimeError(f"{fn.__name__} broke")
        return [fn()] * 4, "fake"
    monkeypatch.setattr(_timing, "do_bench", do_bench)
    return log


def _fn(name, ms):
    f = lambda: ms  # noqa: E731
    f.__name__ = name
    return f


def test_rounds_alternate_columns_and_long_calls_get_two(monkeypatch):
    log = _recorder(monkeypatch)
    entered = []

    @contextlib.contextmanager
    def ctx():
        entered.append(1)
        yield
    conditioned = []
    calls = [(_fn("a", 1.0), (), 1.0, ctx), (_fn("b", 20.0), (), 20.0, contextlib.nullcontext),
             (_fn("c", 0.1), (), 0.1, contextlib.nullcontext)]
    res = _timing.gpu_times(calls, condition=(lambda: conditioned.append(len(log)), 10.0))
    # rounds rotate the order; b (over 10 ms) gets two; c (under COND_FROM_MS) is not conditioned
    assert log == [("a", True), ("b", True), ("c", True), ("b", False), ("c", False), ("a", False),
                   ("c", False), ("a", False)]
    assert len(entered) == 3  # a's context around each of its repeats
    n = int(_timing.COND_MS / 10.0)  # the condition runs COND_MS (at its 10 ms per call) before a and b
    assert conditioned == [0] * n + [1] * n + [3] * n + [5] * n + [7] * n
    assert res[0]["median_ms"] == 1.0 and res[0]["repeat_ms"] == [1.0] * 3 and res[0]["samples"] == 12
    assert res[1]["repeat_ms"] == [20.0] * 2 and res[1]["spread"] == 0 and res[2]["repeat_ms"] == [0.1] * 3


def test_a_failing_column_leaves_the_rounds_and_the_row_reports_it(monkeypatch):
    log = _recorder(monkeypatch, fail=("b",))
    cols = ("cublas", "bnb_peft", "torchao")
    monkeypatch.setattr(_impls, "Workspace", lambda shape: SimpleNamespace(shape=shape, release=lambda: None))
    monkeypatch.setattr(_impls, "build", lambda ws, cell: (_fn({"cublas": "a", "bnb_peft": "b"}[cell.column], 2.0), []))
    monkeypatch.setattr(_harness, "_sanity", lambda cell, outs: None)
    monkeypatch.setattr(_timing, "host_and_memory", lambda *a: {"host_ms": 0.1, "wall_ms": 2.0, "peak_extra_mib": 0})
    monkeypatch.setattr(_harness.Bench, "_check_context", lambda self, e: None)  # no CUDA context on the CPU
    b = _harness.Bench(SimpleNamespace(reference_all_m=False, log=print))
    b.reasons = {"torchao": "torchao is not installed"}
    cells = _sweep.plan(("4096x4096",), (2048,), (16,), ("fwd",), cols)
    b.row_sizes = {cells[0].row: len(cells)}
    rows = [b.run_layer(c, SimpleNamespace(pedantic=None)) for c in cells]
    assert [x for x in log if x[0] == "b"] == [("b", True)]  # b failed in round 1 and left the rounds
    assert [x[0] for x in log] == ["a", "b", "a", "a"]  # nothing timed before the row's last column (skipped)
    assert b.cells[0]["median_ms"] == 2.0 and not b.cells[0]["host_bound"]
    assert b.cells[1]["status"] == "error" and "b broke" in b.cells[1]["reason"]
    assert rows[2]["status"] == "error" and "bnb_peft: " in rows[2]["reason"]  # the last item fails, naming it
    assert b.cells[2]["status"] == "skipped"  # the record of the skipped column itself is unchanged


def test_small_m_forward_cells_also_time_a_graph_replay(monkeypatch):
    log = _recorder(monkeypatch, fail=("b_graph",))
    monkeypatch.setattr(_impls, "Workspace", lambda shape: SimpleNamespace(shape=shape, release=lambda: None))
    monkeypatch.setattr(_impls, "build", lambda ws, cell: (_fn({"cublas": "a", "bnb_peft": "b"}[cell.column], 0.05), []))
    monkeypatch.setattr(_harness, "_sanity", lambda cell, outs: None)
    monkeypatch.setattr(_timing, "host_and_memory", lambda *a: {"host_ms": 0.1, "wall_ms": 0.1, "peak_extra_mib": 0})
    monkeypatch.setattr(_timing, "graphed", lambda fn: _fn(fn.__name__ + "_graph", fn() / 5))
    monkeypatch.setattr(_harness.Bench, "_check_context", lambda self, e: None)  # no CUDA context on the CPU
    b = _harness.Bench(SimpleNamespace(reference_all_m=False, log=print))
    cells = _sweep.plan(("4096x4096",), (16, 2048), (16,), ("fwd",), ("cublas", "bnb_peft"))
    b.row_sizes = {c.row: 2 for c in cells}
    rows = [b.run_layer(c, SimpleNamespace(pedantic=None)) for c in cells]
    assert all(r["status"] == "ok" for r in rows)  # a replay that fails is recorded, the cell stays timed
    assert b.cells[0]["median_ms"] == 0.05 and b.cells[0]["graph_ms"] == 0.01
    assert "graph_ms" not in b.cells[1] and "b_graph broke" in b.cells[1]["graph_reason"]
    assert "graph_ms" not in b.cells[2] and "graph_ms" not in b.cells[3]  # m = 2048: no graph
    assert {x[0] for x in log} == {"a", "b", "a_graph", "b_graph"}
