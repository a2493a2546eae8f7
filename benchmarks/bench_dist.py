"""Data-parallel engines in one run: ours (ZeRO 1/2/3) vs FSDP2 vs DDP, same model, same global batch.

    python benchmarks/bench_dist.py                                  # CPU: 2 gloo ranks, tiny MAE
    python benchmarks/bench_dist.py --world 4 --preset vit_b16 --batch-size 32 --task wsp
    python benchmarks/bench_dist.py --world 1 --preset vit_h14 --batch-size 64   # one GPU: NCCL, world 1
    torchrun --nproc-per-node 8 benchmarks/bench_dist.py --preset vit_l16 --batch-size 1024  # one rank per GPU

Reports the median step time, the elements / bytes communicated per step (counted from the
collectives; DDP and ZeRO-1/2 move 2Ψ, ZeRO-3 and FSDP2 3Ψ for what they reshard), and the peak
memory per rank. Same as ``maws-bench dist``; rows are appended to benchmarks/results/dist.json.
"""
import argparse
import sys

from maws_fast.bench.dist import add_dist_args, bench_dist
from maws_fast.errors import UserError

if __name__ == "__main__":  # the guard also keeps the spawned ranks from re-running the benchmark
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_dist_args(parser)
    try:
        bench_dist(parser.parse_args())
    except UserError as e:
        print(f"bench_dist.py: error: {e}", file=sys.stderr)
        sys.exit(2)
