"""Entry points: ``maws-train``, ``maws-data``, ``maws-bench``, ``maws-ckpt``.

Errors a user can cause end as one line on stderr and exit status 2; no traceback.
"""
from __future__ import annotations

import argparse
import sys

from maws_fast.errors import UserError


def _fail(prog: str, err: Exception) -> int:
    """One line on stderr; exit 2, or the error's own ``exit_code`` (a preempted run: 75, resumable)."""
    code = getattr(err, "exit_code", 2)
    print(f"{prog}: {'error: ' if code == 2 else ''}{err}", file=sys.stderr)
    return code


def _record(fn):
    """Under torchrun, its error-file hook: a rank's unexpected exception reaches torchrun's failure summary."""
    import functools
    import os

    @functools.wraps(fn)
    def wrapper(*args, **kwargs):
        if "TORCHELASTIC_ERROR_FILE" not in os.environ:  # not launched by torchrun: nothing to report to
            return fn(*args, **kwargs)
        from torch.distributed.elastic.multiprocessing.errors import record

        return record(fn)(*args, **kwargs)

    return wrapper


@_record
def train_main(argv: list[str] | None = None) -> int:
    """maws-train --config FILE [--data DIR] [--out DIR] [--section.key=value ...]

    One process, or one per device under ``torchrun --no-python maws-train ...``.
    """
    from maws_fast.config import section_names  # the config imports no torch: cheap before --help

    parser = argparse.ArgumentParser(
        prog="maws-train",
        description="MAE pre-pretraining -> weakly supervised pretraining -> linear probe + few-shot.",
        epilog="Any config field can be overridden: --mae.epochs=2 --run.stages=[mae,wsp] --model.attn_backend=manual. "
               "--help-config lists every field with its type, default and help (--help-config SECTION: one section).",
    )
    parser.add_argument("--config", help="YAML config (e.g. configs/demo_fmnist.yaml); defaults apply without one")
    parser.add_argument("--data", help="dataset directory (same as --data.root=DIR)")
    parser.add_argument("--out", help="output directory (same as --run.out_dir=DIR)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    parser.add_argument("--help-config", nargs="?", const="", metavar="SECTION",
                        help=f"list every config field (or one section's: {', '.join(section_names())}) "
                             "with its type, default and help, and exit")
    args, rest = parser.parse_known_args(argv)
    try:
        from maws_fast.config import config_help, load_config

        if args.help_config is not None:
            print(config_help(args.help_config or None))
            return 0

        overrides = list(rest)
        if args.data:
            overrides.append(f"--data.root={args.data}")
        if args.out:
            overrides.append(f"--run.out_dir={args.out}")
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(cfg.to_json())
            return 0
        from maws_fast.train.recipe import run_recipe

        run_recipe(cfg)
    except UserError as e:
        return _fail("maws-train", e)
    except KeyboardInterrupt:
        print("maws-train: interrupted; completed checkpoints are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def ckpt_main(argv: list[str] | None = None) -> int:
    """maws-ckpt consolidate CKPT_DIR OUT.safetensors"""
    parser = argparse.ArgumentParser(prog="maws-ckpt", description="Sharded checkpoint tools.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("consolidate", help="merge a sharded checkpoint into one model.safetensors (timm keys)")
    p.add_argument("ckpt", help="sharded checkpoint directory, e.g. out/mae/step_00000200")
    p.add_argument("out", help="output file, e.g. model.safetensors")
    args = parser.parse_args(argv)
    try:
        from maws_fast.parallel.checkpoint import export_safetensors

        out = export_safetensors(args.ckpt, args.out)
    except UserError as e:
        return _fail("maws-ckpt", e)
    print(f"wrote {out}")
    return 0


def data_main(argv: list[str] | None = None) -> int:
    """maws-data shards|verify|stats|vocab|tokenizer [...]: see maws_fast/data/tools.py."""
    from maws_fast.data.tools import data_main as run

    return run(argv)


def bench_parser() -> argparse.ArgumentParser:
    """maws-bench's argument parser (scripts/gpu_tier.sh --dry-run parses its planned commands with it)."""
    parser = argparse.ArgumentParser(prog="maws-bench", description="Benchmarks.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    from maws_fast.bench.data import add_data_args
    from maws_fast.bench.dist import add_dist_args
    from maws_fast.bench.kernels import add_kernel_args
    from maws_fast.bench.plot import add_plot_args
    from maws_fast.bench.step import add_step_args
    from maws_fast.bench.train import add_train_args

    add_train_args(sub.add_parser("train", help="MAE and WSP training-step throughput of a preset"))
    add_step_args(sub.add_parser("step", help="official-equivalent vs ours: bytes, FLOPs, roofline, measured img/s"))
    add_kernel_args(sub.add_parser("kernels", help="fused kernels vs torch eager and torch.compile"))
    add_data_args(sub.add_parser("data", help="DALI input pipeline vs the PIL / DataLoader reference"))
    add_dist_args(sub.add_parser("dist", help="ours (ZeRO 1/2/3) vs FSDP2 vs DDP: step time, bytes per step, memory"))
    add_plot_args(sub.add_parser("plot", help="PNG charts: a run's loss / images/s curves, the step and fit tables"))
    return parser


def bench_main(argv: list[str] | None = None) -> int:
    """maws-bench train|step|kernels|data|dist|plot [...]: see benchmarks/bench_train.py, bench_step.py,
    bench_<op>.py, bench_data.py, bench_dist.py, and maws_fast/bench/plot.py."""
    from maws_fast.bench.data import bench_data
    from maws_fast.bench.dist import bench_dist
    from maws_fast.bench.kernels import bench_kernels
    from maws_fast.bench.plot import bench_plot
    from maws_fast.bench.step import bench_step
    from maws_fast.bench.train import bench_train

    parser = bench_parser()
    args = parser.parse_args(argv)
    try:
        {"train": bench_train, "step": bench_step, "kernels": bench_kernels, "data": bench_data, "dist": bench_dist,
         "plot": bench_plot}[args.cmd](args)
    except UserError as e:
        return _fail("maws-bench", e)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())
