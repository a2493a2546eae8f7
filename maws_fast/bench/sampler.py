"""The epoch order (:mod:`maws_fast.data.sampler`) at scale: its memory and start-up at a billion
samples, the host time per position, and how well a global batch is shuffled.

* scale: ``--shards`` x ``--shard-size`` samples (default 100k x 10k = one billion, sizes drawn
  +-10% around the mean so the windows are ragged); the order's state bytes and its start-up time;
  the microseconds of one core per position, for a million random positions and for consecutive
  global batches (what a loader asks), at that scale and at 1/1000 of it (O(1) per position: the two
  should match);
* quality, at the default window and ``--batch-size`` (4096): the distinct shards per global batch,
  and, for data written in class order (each shard one class: the worst case, ImageNet folders
  sharded without a shuffle), the share of neighbouring positions of one class and the distinct
  classes per batch, against an i.i.d. draw of the same batch. The cost of a window: a node holds
  that many shards open, and reads every shard once per epoch.

Goals (issue 30): <= 64 MB and <= 2 s at a billion samples; O(1) per position. Rows go to
``sampler.json``.
"""
from __future__ import annotations

import argparse
import time

import numpy as np

from maws_fast.bench.common import OUT_HELP, default_out, env_info
from maws_fast.bench.results import ResultsFile
from maws_fast.data.sampler import EpochOrder

GOAL_MB, GOAL_START_S = 64, 2.0


def add_sampler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--shards", type=int, default=100_000, help="shards of the synthetic source")
    p.add_argument("--shard-size", type=int, default=10_000, help="mean samples per shard (+-10%%)")
    p.add_argument("--window", type=int, default=64, help="shards per shuffle window (the sampler's default)")
    p.add_argument("--batch-size", type=int, default=4096, help="global batch of the quality rows")
    p.add_argument("--classes", type=int, default=1000, help="classes of the class-ordered quality source")
    p.add_argument("--positions", type=int, default=1_000_000, help="random positions timed per scale")
    p.add_argument("--out", default=default_out("sampler.json"), help=OUT_HELP)


def _sizes(shards: int, mean: int, seed: int = 0) -> np.ndarray:
    rng = np.random.default_rng(seed)
    return rng.integers(int(mean * 0.9), int(mean * 1.1) + 1, size=shards)


def _scale_row(shards: int, mean: int, window: int, positions: int, batch: int) -> dict:
    sizes = _sizes(shards, mean)
    t = time.perf_counter()
    order = EpochOrder(sizes, seed=0, epoch=0, window=window)
    start_s = time.perf_counter() - t
    rng = np.random.default_rng(1)
    pos = rng.integers(0, len(order), size=positions)
    t = time.perf_counter()
    for chunk in np.array_split(pos, max(1, positions // batch)):
        order.sample_ids(chunk)
    random_us = (time.perf_counter() - t) / positions * 1e6
    batch = min(batch, len(order))  # a source smaller than one batch: one batch of all of it
    steps = min(64, len(order) // batch)
    first = rng.integers(0, len(order) // batch - steps + 1)
    t = time.perf_counter()
    for s in range(first, first + steps):
        order.sample_ids(np.arange(s * batch, (s + 1) * batch))
    batch_us = (time.perf_counter() - t) / (steps * batch) * 1e6
    return {"bench": "sampler", "what": "scale", "samples": len(order), "shards": shards, "window": window,
            "state_bytes": order.state_bytes(), "state_mb": round(order.state_bytes() / 2**20, 2), "start_s": round(start_s, 3),
            "us_per_position_random": round(random_us, 3), "us_per_position_batches": round(batch_us, 3)}


def _quality_row(shards: int, mean: int, window: int, batch: int, classes: int, batches: int = 32) -> dict:
    """Class-ordered data (sample id // (N / classes)): how mixed consecutive global batches are."""
    sizes = _sizes(shards, mean)
    order = EpochOrder(sizes, seed=0, epoch=0, window=window)
    n = len(order)
    per_class = -(-int(sizes.sum()) // classes)
    rng = np.random.default_rng(2)
    shards_per, same_next, classes_per = [], [], []
    for s in rng.choice(n // batch, size=min(batches, n // batch), replace=False):
        shard, slot = order.locate(np.arange(s * batch, (s + 1) * batch))
        ids = order.starts[shard] + slot  # what sample_ids() returns, from the one lookup
        label = ids // per_class
        shards_per.append(len(np.unique(shard)))
        same_next.append(float((label[1:] == label[:-1]).mean()))
        classes_per.append(len(np.unique(label)))
    iid = rng.integers(0, n, size=(batches, batch)) // per_class
    iid_same = float((iid[:, 1:] == iid[:, :-1]).mean())
    iid_classes = float(np.mean([len(np.unique(r)) for r in iid]))
    return {"bench": "sampler", "what": "quality", "samples": n, "shards": shards, "window": window, "batch": batch,
            "classes": classes, "shards_per_batch_mean": round(float(np.mean(shards_per)), 1),
            "shards_per_batch_min": int(np.min(shards_per)),
            "same_class_neighbours": round(float(np.mean(same_next)), 5), "same_class_neighbours_iid": round(iid_same, 5),
            "classes_per_batch": round(float(np.mean(classes_per)), 1), "classes_per_batch_iid": round(iid_classes, 1),
            "shards_open_per_node": window, "shard_reads_per_node_epoch": shards}


def bench_sampler(args: argparse.Namespace) -> list[dict]:
    info = env_info()
    out = ResultsFile(args.out)
    rows = []
    small = max(1, args.shards // 1000)
    for shards in (small, args.shards):
        r = {**_scale_row(shards, args.shard_size, args.window, args.positions, args.batch_size), **info}
        out.add(r)
        rows.append(r)
        print(f"{r['samples']:>13,} samples in {shards:,} shards (window {args.window}): state {r['state_mb']} MB, "
              f"start-up {r['start_s']} s, {r['us_per_position_random']} us per random position, "
              f"{r['us_per_position_batches']} us per position of consecutive batches")
    big = rows[-1]
    ok = big["state_mb"] <= GOAL_MB and big["start_s"] <= GOAL_START_S
    print(f"goal at {big['samples']:,} samples: <= {GOAL_MB} MB and <= {GOAL_START_S} s: {'met' if ok else 'NOT met'}; "
          f"per position x{big['us_per_position_random'] / max(rows[0]['us_per_position_random'], 1e-9):.2f} of the "
          f"1/1000 scale (O(1): about 1)")
    for window in sorted({1, 8, args.window}):
        q = {**_quality_row(args.shards, args.shard_size, window, args.batch_size, args.classes), **info}
        out.add(q)
        rows.append(q)
        print(f"window {window:>3}: {q['shards_per_batch_mean']} shards per batch of {args.batch_size} (min "
              f"{q['shards_per_batch_min']}); class-ordered data: same class next {q['same_class_neighbours']} "
              f"(i.i.d. {q['same_class_neighbours_iid']}), {q['classes_per_batch']} classes per batch (i.i.d. "
              f"{q['classes_per_batch_iid']}); {window} shards open per node")
    if out.path is not None:
        print(f"appended {len(rows)} rows to {out.path}")
    return rows
