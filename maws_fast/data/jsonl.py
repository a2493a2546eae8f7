"""The one reader of the JSONL files a user hands the data layer: hashtag rows
(``{"file": ..., "tags": [...]}``), caption rows (``{"file": ..., "caption": "..."}``) and caption
corpora (``{"caption": "..."}``).

Blank lines are skipped; a missing file, or a line that is not a JSON object with the wanted keys,
is one :class:`~maws_fast.errors.DataError` naming the file and line and the row it expected.
"""
from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from maws_fast.errors import DataError


def jsonl_rows(path: str | Path, keys: tuple[str, ...], what: str, missing_hint: str) -> Iterator[tuple[int, dict]]:
    """(line number, row) of every non-blank line of ``path``, each a JSON object holding ``keys``.

    Args:
        path: the JSONL file.
        keys: the keys every row must have.
        what: what the file is, for the error of a missing one ("hashtag file", "caption file").
        missing_hint: what to pass instead, for that error.
    """
    p = Path(path)
    if not p.is_file():
        raise DataError(f"{what} {p} does not exist; {missing_hint}")
    expected = "{" + ", ".join(f'"{k}": ...' for k in keys) + "}"
    with open(p, encoding="utf-8") as f:
        for no, line in enumerate(f, start=1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
            except ValueError as e:
                raise DataError(f"{p}:{no}: expected {expected} ({type(e).__name__}: {e})") from None
            missing = [k for k in keys if k not in row] if isinstance(row, dict) else keys
            if missing:
                got = f"no {missing[0]!r}" if isinstance(row, dict) else f"a JSON {type(row).__name__}"
                raise DataError(f"{p}:{no}: expected {expected} (got {got})")
            yield no, row


def check_caption(path: str | Path, no: int, caption: object) -> str:
    """``caption`` if it is a string, else the DataError naming ``path``'s line ``no``."""
    if not isinstance(caption, str):
        raise DataError(f"{path}:{no}: \"caption\" is {type(caption).__name__}, not a string")
    return caption
