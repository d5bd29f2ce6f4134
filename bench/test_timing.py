"""CPU checks of the side-by-side timing of a row's columns (bench/_timing.gpu_times, bench/_harness.Bench): the
order of the calls, the rounds and what a failing column does, with the CUDA-event clock replaced by a recorder."""

import contextlib
from collections import Counter
from types import SimpleNamespace

from bench import _harness, _impls, _sweep, _timing


def _recorder(monkeypatch, fail=()):
    """_timing._Clock replaced: each timed call is logged (name, inside its context?) and 'takes' what fn returns."""
    log = []

    class Clock:
        def time(self, fn, grads, context, lead_in=True):
            with context() as inside:
                log.append((fn.__name__, inside))
                if fn.__name__ in fail:
                    raise RuntimeError(f"{fn.__name__} broke")
                return fn()

        def read(self, handles):
            log.append("sync")
            return list(handles)
    monkeypatch.setattr(_timing, "_Clock", Clock)
    return log


def _fn(name, ms):
    f = lambda: ms  # noqa: E731
    f.__name__ = name
    return f


def test_williams_order_balances_who_follows_whom():
    for n in range(1, 10):
        period = n if n % 2 == 0 else 2 * n
        rounds = [_timing.williams_order(n, i) for i in range(period)]
        assert all(sorted(r) == list(range(n)) for r in rounds)
        follows = Counter((r[j], r[j + 1]) for r in rounds for j in range(n - 1))
        assert len(follows) == n * (n - 1) and set(follows.values()) <= {period // n}  # each ordered pair equally
        assert Counter(r[0] for r in rounds) == Counter({j: period // n for j in range(n)})  # each first equally


def test_rounds_interleave_the_columns_in_williams_order(monkeypatch):
    log = _recorder(monkeypatch)

    @contextlib.contextmanager
    def ctx():
        yield "forced"
    calls = [(_fn("a", 1.0), (), 1.0, ctx), (_fn("b", 20.0), (), 20.0, contextlib.nullcontext),
             (_fn("c", 0.1), (), 0.1, contextlib.nullcontext)]
    res = _timing.gpu_times(calls)
    n = len(log) // 4
    rounds = [log[i * 4:(i + 1) * 4] for i in range(n)]
    assert len(log) == 4 * n and all(r[-1] == "sync" for r in rounds)  # every column once per round, then a sync
    timed = n - _timing.WARMUP_ROUNDS
    assert timed % 6 == 0 and timed >= _timing.ROUNDS_MIN  # whole periods of the design (3 columns: 6 rounds)
    names = "abc"
    assert [[x[0] for x in r[:3]] for r in rounds[_timing.WARMUP_ROUNDS:]] == [
        [names[j] for j in _timing.williams_order(3, i % 6)] for i in range(timed)]
    assert all(x[1] == ("forced" if x[0] == "a" else None) for r in rounds for x in r[:3])  # a inside its context
    assert res[0] == {"median_ms": 1.0, "spread": 0.0, "samples": timed, "repeat_ms": [1.0] * 3,
                      "timer": "interleaved CUDA events"}
    assert res[1]["median_ms"] == 20.0 and res[2]["median_ms"] == 0.1


def test_short_rows_get_more_rounds_and_the_medians_come_from_the_samples(monkeypatch):
    _recorder(monkeypatch)
    times = iter([5.0, 1.0, 2.0, 3.0] * 100)
    calls = [(lambda: next(times), (), 0.01, contextlib.nullcontext)]
    res = _timing.gpu_times(calls)[0]
    assert res["samples"] == 2 * round(_timing.ROUNDS_MAX / 2)  # ROW_MS / 0.01 ms is over the cap; 1 call: period 2
    assert res["median_ms"] == 2.5 and len(res["repeat_ms"]) == 3
    assert res["spread"] == (max(res["repeat_ms"]) - min(res["repeat_ms"])) / 2.5


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
    calls = [x[0] for x in log if x != "sync"]
    assert calls.count("b") == 1  # b failed in its first round and left the rounds
    assert calls[:2] == ["a", "b"] and set(calls[2:]) == {"a"}  # nothing timed before the row's last column
    assert b.cells[0]["median_ms"] == 2.0 and not b.cells[0]["host_bound"]
    assert b.cells[1]["status"] == "error" and "b broke" in b.cells[1]["reason"]
    assert rows[2]["status"] == "error" and "bnb_peft: " in rows[2]["reason"]  # the last item fails, naming it
    assert b.cells[2]["status"] == "skipped"  # the record of the skipped column itself is unchanged


def test_small_m_and_host_bound_cells_also_time_a_graph_replay(monkeypatch):
    log = _recorder(monkeypatch, fail=("b_graph",))
    monkeypatch.setattr(_impls, "Workspace", lambda shape: SimpleNamespace(shape=shape, release=lambda: None))
    monkeypatch.setattr(_impls, "build", lambda ws, cell: (_fn({"cublas": "a", "bnb_peft": "b"}[cell.column], 0.05), []))
    monkeypatch.setattr(_harness, "_sanity", lambda cell, outs: None)

    def host_and_memory(benchmark, fn, grads, n):  # "a" (cuBLAS) GPU-bound over 1 ms, "b" host-bound
        b = fn.__name__ == "b"
        return {"host_ms": 0.1 if b else 0.01, "wall_ms": 0.1 if b else 2.0, "peak_extra_mib": 0}
    monkeypatch.setattr(_timing, "host_and_memory", host_and_memory)
    monkeypatch.setattr(_timing, "graphed", lambda fn, grads: _fn(fn.__name__ + "_graph", fn() / 5))
    monkeypatch.setattr(_harness.Bench, "_check_context", lambda self, e: None)  # no CUDA context on the CPU
    b = _harness.Bench(SimpleNamespace(reference_all_m=False, log=print))
    cells = _sweep.plan(("4096x4096",), (16, 2048), (16,), ("fwd", "fwd+bwd"), ("cublas", "bnb_peft"))
    b.row_sizes = {c.row: 2 for c in cells}
    rows = [b.run_layer(c, SimpleNamespace(pedantic=None)) for c in cells]
    assert all(r["status"] == "ok" for r in rows)  # a replay that fails is recorded, the cell stays timed
    for c in b.cells:  # fwd and fwd+bwd alike
        if c["m"] == 2048 and c["implementation"] == "cublas":
            assert "graph_ms" not in c and "graph_reason" not in c  # large m, GPU-bound, over 1 ms: no graph
        elif c["implementation"] == "cublas":
            assert c["median_ms"] == 0.05 and c["graph_ms"] == 0.01
        else:  # bnb+PEFT: host-bound, so a graph at every m (whose capture fails here)
            assert "graph_ms" not in c and "b_graph broke" in c["graph_reason"]
    assert len(b.cells) == 8
    assert {x[0] for x in log if x != "sync"} == {"a", "b", "a_graph", "b_graph"}


def test_the_clock_times_the_second_of_two_back_to_back_calls():
    """_Clock.time: a lead-in call, then the L2 flush, then the timed call between its two events."""
    log = []

    class Event:
        def __init__(self, enable_timing):
            self.name = f"event{len([x for x in log if x.startswith('new')])}"
            log.append("new " + self.name)

        def record(self):
            log.append("record " + self.name)

    fake = SimpleNamespace(cuda=SimpleNamespace(Event=Event))
    clock = _timing._Clock.__new__(_timing._Clock)  # no CUDA here: the torch calls are the fake's
    clock.torch, clock.flush = fake, SimpleNamespace(zero_=lambda: log.append("flush"))
    grad = SimpleNamespace(grad="stale")

    def fn():
        log.append(f"fn grad={grad.grad}")

    @contextlib.contextmanager
    def ctx():
        log.append("enter")
        yield
        log.append("exit")
    clock.time(fn, [grad], ctx)
    assert log == ["enter", "fn grad=None", "flush", "new event0", "new event1", "record event0", "fn grad=None",
                   "record event1", "exit"]
    log.clear()
    clock.time(fn, [grad], ctx, lead_in=False)  # a long call: no lead-in
    assert log == ["enter", "flush", "new event0", "new event1", "record event0", "fn grad=None", "record event1",
                   "exit"]
