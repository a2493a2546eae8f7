"""Benchmark of maws_kernels' flash attention against SDPA (flash / efficient / cuDNN), xformers and
the manual reference, forward / backward / both, in TFLOP/s.

    python benchmarks/bench_attention.py                          # GPU: B/16, L/16, H/14 at batch 256
    TRITON_INTERPRET=1 python benchmarks/bench_attention.py --models tiny --batch-size 1 --out ''  # CPU smoke

Same as ``maws-bench kernels --ops attention``; rows are appended to benchmarks/results/kernels.json.
"""
import argparse

from maws_fast.bench.kernels import add_kernel_args, bench_kernels

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_kernel_args(parser, ops=("attention",))
    bench_kernels(parser.parse_args())
