"""Benchmarks (`make bench`); never run by the test suite."""
