"""qlora_ext benchmarks: ``pytest bench/`` (bench/README.md). A package so that ``python -m bench.report`` and
``python -m bench.policy`` work from the repository root and bench/conftest.py never clashes with tests/'."""
