"""Training-step throughput of a preset, per attention backend, in one run.

    python benchmarks/bench_train.py --preset tiny --batch-size 256      # CPU
    python benchmarks/bench_train.py --preset vit_b16 --batch-size 256   # GPU (bf16 autocast)

Same as ``maws-bench train``; rows are appended to benchmarks/results/train.json.
"""
import argparse

from maws_fast.bench import add_train_args, bench_train

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_train_args(parser)
    bench_train(parser.parse_args())
