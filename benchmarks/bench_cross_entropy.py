"""Benchmark of maws_kernels' cross_entropy: ours vs torch eager vs torch.compile, forward / backward / both.

    python benchmarks/bench_cross_entropy.py                          # GPU: B/16, L/16, H/14 MAE shapes, batch 256
    python benchmarks/bench_cross_entropy.py --models tiny --batch-size 2 --out ''   # CPU smoke run (interpreter)
    python benchmarks/bench_cross_entropy.py --providers ours,torch,liger   # GPU: + Liger (hard-label CE, linear CE)

Same as ``maws-bench kernels --ops cross_entropy``; rows are appended to benchmarks/results/kernels.json.
See maws_fast/bench/cases/cross_entropy.py for the shapes and the bytes each case must move.
"""
import argparse

from maws_fast.bench.kernels import add_kernel_args, bench_kernels

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_kernel_args(parser, ops=("cross_entropy",))
    bench_kernels(parser.parse_args())
