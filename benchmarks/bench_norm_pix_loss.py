"""Benchmark of maws_kernels' norm_pix_loss: ours vs torch eager vs torch.compile, forward / backward / both.

    python benchmarks/bench_norm_pix_loss.py                          # GPU: B/16, L/16, H/14 MAE shapes, batch 256
    python benchmarks/bench_norm_pix_loss.py --models tiny --batch-size 2 --out ''   # CPU smoke run (interpreter)

Same as ``maws-bench kernels --ops norm_pix_loss``; rows are appended to benchmarks/results/kernels.json.
See maws_fast/bench/cases/norm_pix_loss.py for the shapes and the bytes each case must move.
"""
import argparse

from maws_fast.bench.kernels import add_kernel_args, bench_kernels

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_kernel_args(parser, ops=("norm_pix_loss",))
    bench_kernels(parser.parse_args())
