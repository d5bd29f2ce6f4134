"""qlora_ext benchmark suite: ``pytest bench/`` (see bench/README.md).

A package so that ``python -m bench.report`` and ``python -m bench._selftest`` work from the repository root
and so that ``bench/conftest.py`` never clashes with ``tests/conftest.py``.
"""
