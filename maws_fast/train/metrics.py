"""Metrics: one JSON object per line (JSONL), appended, so a resumed run continues the file."""
from __future__ import annotations

import json
import time
from pathlib import Path


class MetricsWriter:
    """Appends dict rows to ``path`` as JSONL; flushes every row so a crash loses nothing logged."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        row = {"time": round(time.time(), 3), **row}
        self._f.write(json.dumps(row, sort_keys=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path: str | Path) -> list[dict]:
    """All rows of a JSONL metrics file (empty list if it does not exist)."""
    p = Path(path)
    if not p.exists():
        return []
    return [json.loads(line) for line in p.read_text().splitlines() if line.strip()]


def drop_rows_after(path: str | Path, step: int) -> int:
    """Remove rows logged after ``step`` (a resumed run re-does those steps); returns how many.

    The file is rewritten atomically, so a crash here cannot lose the rows that are kept.
    """
    from maws_fast.train.checkpoint import atomic_write_text

    rows = read_metrics(path)
    keep = [r for r in rows if r.get("step", 0) <= step]
    if len(keep) < len(rows):
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
    return len(rows) - len(keep)


class Throughput:
    """Images/s and achieved FLOP/s between two log points (wall clock)."""

    def __init__(self, flops_per_image: float):
        self.flops_per_image = flops_per_image
        self.t0 = time.perf_counter()
        self.images = 0

    def add(self, n: int) -> None:
        self.images += n

    def read_and_reset(self) -> dict:
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        ips = self.images / dt
        out = {"images_per_s": round(ips, 2), "tflops": round(ips * self.flops_per_image / 1e12, 6)}
        self.t0, self.images = now, 0
        return out
