"""Shared benchmark plumbing: environment rows, timers, the HBM copy roofline, result files.

Every results row carries the device, commit, date, torch version and the command that produced
it, so the README tables (benchmarks/render_tables.py) are generated from files, never typed.
"""
from __future__ import annotations

import datetime
import os
import platform
import subprocess
import sys
import time
from pathlib import Path
from typing import Callable

import torch

# Dense bf16 peak of the devices we report MFU for (docs/ARCHITECTURE.md: H100 SXM 989 TFLOP/s).
# Where maws-bench writes when no --out is given: a folder of the current directory that no checkout
# tracks (.gitignore), so a benchmark run never rewrites the repository's own tables
# (benchmarks/results/*.json, docs/plots/) unless they are named with --out. MAWS_BENCH_OUT moves it.
OUT_DIR = os.environ.get("MAWS_BENCH_OUT", "maws-bench-out")
REPO_RESULTS = "benchmarks/results"  # the repository's tables: README's are rendered from them
OUT_HELP = (f"JSON file to append to ('' = none; default under ${{MAWS_BENCH_OUT}} = {OUT_DIR}; the repository's "
            f"tables: {REPO_RESULTS}/<name>.json)")


def default_out(name: str) -> str:
    """The default ``--out`` of a benchmark writing ``name`` (e.g. ``step.json``): under :data:`OUT_DIR`."""
    return f"{OUT_DIR}/{name}"


PEAK_TFLOPS = {"H100": 989.0, "H200": 989.0}


def env_info() -> dict:
    """Device, commit and date for a results row."""
    if torch.cuda.is_available():
        device = torch.cuda.get_device_name()
    else:
        device = f"cpu: {platform.processor() or platform.machine()}, {torch.get_num_threads()} threads"
    # MAWS_COMMIT: set by scripts/gpu_tier.sh on a device that gets the working tree without its .git
    commit = os.environ.get("MAWS_COMMIT", "").strip()
    if not commit:
        try:
            commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                                    check=True).stdout.strip()  # of the checkout the benchmark runs in
        except (OSError, subprocess.CalledProcessError):
            commit = "unknown"
    return {"device": device, "commit": commit, "date": datetime.date.today().isoformat(),
            "torch": torch.__version__, "command": " ".join([Path(sys.argv[0]).name, *sys.argv[1:]])}


def append_results(path: str | Path, rows: list[dict]) -> None:
    """Append rows to a JSON list file (created if missing) in one atomic rewrite: the same writer as
    the rows measured one at a time (:class:`maws_fast.bench.results.ResultsFile`)."""
    from maws_fast.bench.results import ResultsFile

    out = ResultsFile(path)
    out.rows.extend(rows)
    out.save()


def peak_tflops(device_name: str) -> float | None:
    return next((v for k, v in PEAK_TFLOPS.items() if k in device_name), None)


def sync(device: torch.device | str) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize()  # the timer must see finished GPU work


def time_steps(step_fn: Callable[[], object], steps: int, warmup: int, device: torch.device | str) -> float:
    """Median seconds per call of ``step_fn`` over ``steps`` timed calls after ``warmup``."""
    for _ in range(warmup):
        step_fn()
    sync(device)
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step_fn()
        sync(device)
        times.append(time.perf_counter() - t)
    return sorted(times)[len(times) // 2]


def bench_ms(fn: Callable[[], object], device: torch.device | str, grad_to_none: list[torch.Tensor] | None = None,
             rep_ms: int = 100, cpu_steps: int = 5) -> float:
    """Median milliseconds of ``fn``.

    On CUDA this is ``triton.testing.do_bench`` (L2 flushed between calls, median over ``rep_ms``
    of repetitions). On CPU it is :func:`time_steps` with ``cpu_steps`` timed calls, for checking
    that a benchmark runs, not for reporting kernel speed (Triton runs under its interpreter there).
    """
    if torch.device(device).type == "cuda":
        from triton.testing import do_bench

        return float(do_bench(fn, warmup=25, rep=rep_ms, grad_to_none=grad_to_none, return_mode="median"))

    def call():
        if grad_to_none:
            for t in grad_to_none:
                t.grad = None
        fn()

    return 1e3 * time_steps(call, cpu_steps, 1, device)


_COPY_GBPS: dict[str, float] = {}


def copy_bandwidth_gbps(device: torch.device | str, nbytes: int | None = None) -> float:
    """Measured device-to-device copy bandwidth in GB/s (read + write bytes), cached per device.

    This is the roofline a memory-bound kernel is judged against: a kernel that moves N bytes
    at X GB/s runs at X / copy_bandwidth of what the memory system delivers to a plain copy.
    """
    device = torch.device(device)
    key = str(device)
    if key not in _COPY_GBPS:
        nbytes = nbytes or (1 << 30 if device.type == "cuda" else 1 << 26)
        src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
        dst = torch.empty_like(src)
        ms = bench_ms(lambda: dst.copy_(src), device, cpu_steps=5)
        _COPY_GBPS[key] = 2 * nbytes / (ms * 1e-3) / 1e9
    return _COPY_GBPS[key]
