"""Benchmark of maws_kernels' layer_norm: ours vs torch eager vs torch.compile, forward / backward / both.

    python benchmarks/bench_layer_norm.py                          # GPU: B/16, L/16, H/14 MAE shapes, batch 256
    python benchmarks/bench_layer_norm.py --models tiny --batch-size 2 --out ''   # CPU smoke run (interpreter)
    python benchmarks/bench_layer_norm.py --providers ours,torch,liger   # GPU: + Liger-Kernel (its LayerNorm)

Same as ``maws-bench kernels --ops layer_norm``; rows are appended to benchmarks/results/kernels.json.
See maws_fast/bench/cases/layer_norm.py for the shapes and the bytes each case must move.
"""
import argparse

from maws_fast.bench.kernels import add_kernel_args, bench_kernels

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_kernel_args(parser, ops=("layer_norm",))
    bench_kernels(parser.parse_args())
