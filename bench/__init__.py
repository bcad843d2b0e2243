"""Benchmarks: each module's `run(quick)` returns ours-vs-peer `Comparison`s; `python -m bench.run` runs them all."""
