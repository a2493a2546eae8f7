"""Entry points: ``maws-train``, ``maws-data``, ``maws-bench``.

Errors a user can cause end as one line on stderr and exit status 2; no traceback.
"""
from __future__ import annotations

import argparse
import sys

from maws_fast.errors import UserError


def _fail(prog: str, err: Exception) -> int:
    print(f"{prog}: error: {err}", file=sys.stderr)
    return 2


def train_main(argv: list[str] | None = None) -> int:
    """maws-train --config FILE [--data DIR] [--out DIR] [--section.key=value ...]"""
    parser = argparse.ArgumentParser(
        prog="maws-train",
        description="MAE pre-pretraining -> weakly supervised pretraining -> linear probe + few-shot.",
        epilog="Any config field can be overridden: --mae.epochs=2 --run.stages=[mae,wsp] --model.attn_backend=manual",
    )
    parser.add_argument("--config", help="YAML config (e.g. configs/demo_fmnist.yaml); defaults apply without one")
    parser.add_argument("--data", help="dataset directory (same as --data.root=DIR)")
    parser.add_argument("--out", help="output directory (same as --run.out_dir=DIR)")
    parser.add_argument("--print-config", action="store_true", help="print the resolved config and exit")
    args, rest = parser.parse_known_args(argv)
    try:
        from maws_fast.config import load_config

        overrides = list(rest)
        if args.data:
            overrides.append(f"--data.root={args.data}")
        if args.out:
            overrides.append(f"--run.out_dir={args.out}")
        cfg = load_config(args.config, overrides)
        if args.print_config:
            print(cfg.to_json())
            return 0
        from maws_fast.train.stages import run_recipe

        run_recipe(cfg)
    except UserError as e:
        return _fail("maws-train", e)
    except KeyboardInterrupt:
        print("maws-train: interrupted; completed checkpoints are kept, rerun the same command to resume", file=sys.stderr)
        return 130
    return 0


def data_main(argv: list[str] | None = None) -> int:
    """maws-data stats [--data DIR] [--num N] [--seed S]: Fashion-MNIST and weak-hashtag statistics."""
    parser = argparse.ArgumentParser(prog="maws-data", description="Dataset tools.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    st = sub.add_parser("stats", help="counts, class histogram and the weak-hashtag histogram")
    st.add_argument("--data", help="Fashion-MNIST directory (default: Debian's package location)")
    st.add_argument("--num", type=int, default=60000, help="weak-hashtag mosaics to generate")
    st.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)
    try:
        import torch

        from maws_fast.data import fmnist

        for split in ("train", "test"):
            x, y = fmnist.load_fmnist(args.data, split)
            counts = torch.bincount(y, minlength=10).tolist()
            print(f"{split}: {len(y)} images of {tuple(x.shape[1:])} uint8; per class {counts}")
        x, y = fmnist.load_fmnist(args.data, "train")
        _, tags = fmnist.make_weak_hashtags(x, y, args.num, seed=args.seed)
        per_tag = tags.sum(0).long().tolist()
        print(f"weak hashtags: {args.num} mosaics, {tags.sum(1).mean():.2f} tags per image on average")
        for name, n in zip(fmnist.VOCAB, per_tag):
            print(f"  {name:<14} {n}")
    except UserError as e:
        return _fail("maws-data", e)
    return 0


def bench_main(argv: list[str] | None = None) -> int:
    """maws-bench train|kernels [...]: see benchmarks/bench_train.py and benchmarks/bench_<op>.py."""
    parser = argparse.ArgumentParser(prog="maws-bench", description="Benchmarks.")
    sub = parser.add_subparsers(dest="cmd", required=True)
    from maws_fast.bench.kernels import add_kernel_args, bench_kernels
    from maws_fast.bench.train import add_train_args, bench_train

    add_train_args(sub.add_parser("train", help="MAE and WSP training-step throughput of a preset"))
    add_kernel_args(sub.add_parser("kernels", help="fused kernels vs torch eager and torch.compile"))
    args = parser.parse_args(argv)
    try:
        (bench_train if args.cmd == "train" else bench_kernels)(args)
    except UserError as e:
        return _fail("maws-bench", e)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(train_main())
