"""Benchmarks: each prints its figures next to the baseline it ran against in the same run.
Run them from the checkout as modules: `.venv/bin/python -m bench.bench_train_step`."""
