"""Input-pipeline throughput: DALI vs the PIL / torch DataLoader reference, same transforms and threads.

    python benchmarks/bench_data.py                      # CPU: DALI CPU operators vs PIL workers
    python benchmarks/bench_data.py --device cuda \
        --providers dali,dali_uint8,pil,nvjpeg --images 4096 --batch-size 256   # H100: mixed decode

Same as ``maws-bench data``; rows are appended to benchmarks/results/data.json.
"""
import argparse

from maws_fast.bench.data import add_data_args, bench_data

if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    add_data_args(parser)
    bench_data(parser.parse_args())
