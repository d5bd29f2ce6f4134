"""The GPU benchmarks: one item per layer cell (shape x m x r x mode x column) and per e2e cell (implementation x
batch). Each records its figures for the run's JSON; pytest-benchmark's table shows the wall time of synchronized
calls (see bench/README.md). An error fails the item and the run goes on; a cell that cannot run here skips."""

import pytest


def _finish(row: dict, benchmark) -> None:
    if row["status"] == "skipped":
        pytest.skip(row["reason"])
    if row["status"] == "error":
        pytest.fail(row["reason"], pytrace=False)
    benchmark.extra_info.update({k: v for k, v in row.items() if k not in ("status", "reason", "steps_ms")})


@pytest.mark.layer
def test_layer(layer_cell, bench, benchmark):
    _finish(bench.run_layer(layer_cell, benchmark), benchmark)


@pytest.mark.e2e
def test_e2e(e2e_cell, bench, benchmark):
    _finish(bench.run_e2e(*e2e_cell, benchmark), benchmark)
