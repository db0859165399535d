"""Benchmarks: one module per performance claim, each printing one JSON line.

Run them from the repository root as modules (`python -m benchmarks.bench_generate`),
or all at once with `make bench`; `--quick` runs a small version of each.
"""
