"""``maws-bench``: the benchmarks of :mod:`maws_fast.bench` behind one parser."""
from __future__ import annotations

import argparse

from maws_fast.cli.common import fail, quiet_broken_pipe
from maws_fast.errors import UserError


def bench_parser() -> argparse.ArgumentParser:
    """maws-bench's argument parser (scripts/gpu_tier.sh --dry-run parses its planned commands with it)."""
    parser = argparse.ArgumentParser(prog="maws-bench", description="Benchmarks.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    from maws_fast.bench.data import add_data_args
    from maws_fast.bench.dist import add_dist_args
    from maws_fast.bench.kernels import add_kernel_args
    from maws_fast.bench.plot import add_plot_args
    from maws_fast.bench.sampler import add_sampler_args
    from maws_fast.bench.step import add_step_args
    from maws_fast.bench.train import add_train_args

    add_train_args(sub.add_parser("train", help="MAE and WSP training-step throughput of a preset"))
    add_step_args(sub.add_parser("step", help="official-equivalent vs ours: bytes, FLOPs, roofline, measured img/s"))
    add_kernel_args(sub.add_parser("kernels", help="fused kernels vs torch eager and torch.compile"))
    add_data_args(sub.add_parser("data", help="DALI input pipeline vs the PIL / DataLoader reference"))
    add_dist_args(sub.add_parser("dist", help="ours (ZeRO 1/2/3) vs FSDP2 vs DDP: step time, bytes per step, memory"))
    add_sampler_args(sub.add_parser("sampler", help="the epoch order at a billion samples: memory, start-up, "
                                     "us per position, shuffle quality"))
    add_plot_args(sub.add_parser("plot", help="PNG charts: a run's loss / images/s curves, the step and fit tables"))
    return parser


@quiet_broken_pipe
def bench_main(argv: list[str] | None = None) -> int:
    """maws-bench train|step|kernels|data|dist|sampler|plot [...]: see benchmarks/bench_train.py, bench_step.py,
    bench_<op>.py, bench_data.py, bench_dist.py, and maws_fast/bench/plot.py."""
    from maws_fast.bench.data import bench_data
    from maws_fast.bench.dist import bench_dist
    from maws_fast.bench.kernels import bench_kernels
    from maws_fast.bench.plot import bench_plot
    from maws_fast.bench.sampler import bench_sampler
    from maws_fast.bench.step import bench_step
    from maws_fast.bench.train import bench_train

    parser = bench_parser()
    args = parser.parse_args(argv)
    try:
        {"train": bench_train, "step": bench_step, "kernels": bench_kernels, "data": bench_data, "dist": bench_dist,
         "plot": bench_plot, "sampler": bench_sampler}[args.cmd](args)
    except UserError as e:
        return fail("maws-bench", e)
    return 0
