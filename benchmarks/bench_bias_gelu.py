"""Benchmark of maws_kernels' bias_gelu: ours (dbias fused / dbias summed by torch) vs torch eager
vs torch.compile, forward / backward / both.

    python benchmarks/bench_bias_gelu.py                           # GPU: B/16, L/16, H/14 MAE + WSP shapes, batch 256
    python benchmarks/bench_bias_gelu.py --models tiny --batch-size 2 --out ''   # CPU smoke run (interpreter)

Same as ``maws-bench kernels --ops bias_gelu``; rows are appended to benchmarks/results/kernels.json.
See maws_fast/bench/cases/bias_gelu.py for the shapes and the bytes each case must move.
"""
import argparse

from maws_fast.bench.kernels import add_kernel_args, bench_kernels

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_kernel_args(parser, ops=("bias_gelu",))
    bench_kernels(parser.parse_args())
