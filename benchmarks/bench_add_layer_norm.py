"""Benchmark of maws_kernels' add_layer_norm (residual add + LayerNorm, the branch bias folded in):
ours vs torch eager (bias add, residual add, F.layer_norm) vs torch.compile, forward / backward / both.

    python benchmarks/bench_add_layer_norm.py                          # GPU: B/16, L/16, H/14 MAE shapes, batch 256
    python benchmarks/bench_add_layer_norm.py --models tiny --batch-size 2 --out ''   # CPU smoke run (interpreter)

Same as ``maws-bench kernels --ops add_layer_norm``; rows are appended to benchmarks/results/kernels.json.
See maws_fast/bench/cases/add_layer_norm.py for the shapes and the bytes each case must move.
"""
import argparse

from maws_fast.bench.kernels import add_kernel_args, bench_kernels

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_kernel_args(parser, ops=("add_layer_norm",))
    bench_kernels(parser.parse_args())
