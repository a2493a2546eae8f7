"""Benchmarks behind ``maws-bench`` and ``benchmarks/bench_*.py``.

* :mod:`maws_fast.bench.common`  -- environment rows, timers, copy-bandwidth roofline, result files.
* :mod:`maws_fast.bench.train`   -- full training-step throughput per attention backend.
* :mod:`maws_fast.bench.kernels` -- per-op kernel timings (forward, backward, both) against torch
  eager and torch.compile; op cases live in :mod:`maws_fast.bench.cases`.
"""
from maws_fast.bench.common import append_results, env_info
from maws_fast.bench.train import add_train_args, bench_train

__all__ = ["append_results", "env_info", "add_train_args", "bench_train"]
