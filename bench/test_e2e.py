"""End-to-end benchmark: a QLoRA training step of a 4-layer Llama-3-8B-width model (bench/_e2e.py), one item
per (implementation, batch). Times are host wall time of synchronized steps; tokens/s = batch x seq / median.
"""

import pytest

from bench._harness import finish_test

pytestmark = pytest.mark.e2e


def test_e2e_step(e2e_case, bench_session, benchmark):
    impl, batch = e2e_case
    row = bench_session.run_e2e(impl, batch)
    finish_test(row, benchmark, bench_session)
