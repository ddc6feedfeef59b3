"""Slow, obviously correct references shared by the tests and the benchmarks.

Tests import ``from oracles.NAME import ...``; benchmark scripts put ``ROOT / "tests"`` on
``sys.path`` first. One home per reference, so the copy a benchmark times is the copy the
tests verify.
"""
