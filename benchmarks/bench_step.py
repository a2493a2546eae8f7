"""Training-step benchmark: official-equivalent eager / compiled vs ours, counted bytes and FLOPs per image.

    python benchmarks/bench_step.py                                   # counts anywhere; on a GPU also times steps
    python benchmarks/bench_step.py --cases mae:vit_b16 --batch-size 256 --steps 20   # the GPU tier's call

Same as ``maws-bench step``; rows are appended to benchmarks/results/step.json.
See maws_fast/bench/step.py for the variants and maws_fast/bench/traffic.py for the counting rule.
"""
import argparse

from maws_fast.bench.step import add_step_args, bench_step

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_step_args(parser)
    bench_step(parser.parse_args())
