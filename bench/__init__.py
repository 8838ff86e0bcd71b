"""Benchmarks: `make bench` (python -m bench.run). See bench/results.md for the latest numbers."""
