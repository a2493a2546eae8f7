"""Result rows written the moment they are measured, and rows for cases that failed or were skipped.

A benchmark run is minutes to hours of device time; one case that raises (an out-of-memory, a
backend pinned on a dtype it lacks) must not lose the rows measured before it. So every benchmark
writes through a :class:`ResultsFile`: each row is added to the output JSON as soon as it exists,
and the file is rewritten atomically (``storage.atomic_write_text``), so a kill at any
moment leaves a valid JSON list holding the rows so far. The format is the one
``benchmarks/render_tables.py`` and ``maws-bench plot`` read: one JSON list of row objects per file,
earlier runs' rows first.

A case that fails becomes a row with ``"status": "failed"`` and the error's one-line summary
(``"error"``); a case a provider cannot run (cuDNN SDPA on fp32, an op without a CUDA twin) is not
attempted and becomes a row with ``"status": "skipped"`` and a ``"reason"``. Measured rows carry no
``status`` (as before); :func:`is_measured` tells them apart.
"""
from __future__ import annotations

import json
from pathlib import Path

from maws_fast.errors import ConfigError
from maws_fast.storage import atomic_write_text

FAILED, SKIPPED = "failed", "skipped"


def is_measured(row: dict) -> bool:
    """True for a row with numbers in it; False for a failed or skipped case's label row."""
    return row.get("status") not in (FAILED, SKIPPED)


def error_summary(e: BaseException) -> str:
    """``Type: first line of the message`` (at most 300 characters): what a failed row records."""
    text = str(e).strip()
    line = text.splitlines()[0] if text else ""
    return f"{type(e).__name__}: {line[:300]}" if line else type(e).__name__


def failed(row: dict, e: BaseException) -> dict:
    """``row`` (its identifying columns, and whatever was measured before the error) marked failed."""
    row.update(status=FAILED, error=error_summary(e))
    return row


def skipped(row: dict, reason: str) -> dict:
    """``row`` marked as not attempted, saying why."""
    row.update(status=SKIPPED, reason=reason)
    return row


class ResultsFile:
    """The rows of one benchmark run, appended to the JSON list at ``path`` one at a time.

    The rows already in the file are read when it is opened (a file that is not a JSON list is one
    clear error, before anything is measured). :meth:`add` appends a row and rewrites the file;
    :meth:`save` rewrites it after rows already added were updated in place (ratios against a
    baseline measured later). ``path`` None or ``""``: rows are only kept in memory.
    """

    def __init__(self, path: str | Path | None, what: str = "maws-bench"):
        self.path = Path(path) if path else None
        self.rows: list[dict] = []
        self._old: list = []
        if self.path is not None and self.path.exists():
            try:
                self._old = json.loads(self.path.read_text())
            except (OSError, ValueError) as e:
                raise ConfigError(f"{what}: {self.path} is not a readable JSON file ({e}); move it away or pass "
                                  "another --out") from None
            if not isinstance(self._old, list):
                raise ConfigError(f"{what}: {self.path} holds a JSON {type(self._old).__name__}, not the list of "
                                  "rows results files hold; move it away or pass another --out")

    def add(self, row: dict) -> dict:
        self.rows.append(row)
        self.save()
        return row

    def save(self) -> None:
        if self.path is None or not self.rows:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        # atomic: a reader sees the old list or the new one, never half of one
        atomic_write_text(self.path, json.dumps(self._old + self.rows, indent=1) + "\n")
