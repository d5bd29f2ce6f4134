"""Layer benchmarks: one item per (case, implementation), cases = shape x m x r x lora_dropout x mode.

Each item builds its implementation on the shape's shared weights and the case's shared inputs, runs it once
(outputs must exist and be finite), times it (CUDA events, L2 flushed, median), measures its peak extra memory,
and records everything for bench/results/*.json. pytest-benchmark's table shows the same GPU-time samples,
grouped by case.
"""

import pytest

from bench._harness import finish_test

pytestmark = pytest.mark.layer


def test_layer(layer_case, bench_session, benchmark):
    case, impl = layer_case
    row = bench_session.run_layer(case, impl)
    finish_test(row, benchmark, bench_session)
