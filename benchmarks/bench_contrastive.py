"""Benchmark of maws_kernels.contrastive_loss (time and peak memory at B = 4k, 16k, 32k): ours vs torch eager vs torch.compile, forward / backward / both.

    python benchmarks/bench_contrastive.py                 # GPU: B = 4096, 16384, 32768 at D = 768
    python benchmarks/bench_contrastive.py --out ''        # CPU smoke run (interpreter, B = 64)

Same as ``maws-bench kernels --ops contrastive``; rows are appended to benchmarks/results/kernels.json.
See maws_fast/bench/cases/contrastive.py for the shapes and the bytes each case must move.
"""
import argparse

from maws_fast.bench.kernels import add_kernel_args, bench_kernels

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_kernel_args(parser, ops=("contrastive",))
    bench_kernels(parser.parse_args())
