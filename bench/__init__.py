"""The benchmarks, one package run from the repository root: `make bench SUITE=<name> [QUICK=1]` (bench/run.py).
Suites share bench/common.py (conditioning, result files) and tests/support (models, schedules, metrics)."""
