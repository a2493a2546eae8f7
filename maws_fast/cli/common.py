"""What the entry points share: the one line a user error ends in."""
from __future__ import annotations

import sys


def fail(prog: str, err: Exception) -> int:
    """One line on stderr; exit 2, or the error's own ``exit_code`` (a preempted run: 75, resumable)."""
    code = getattr(err, "exit_code", 2)
    print(f"{prog}: {'error: ' if code == 2 else ''}{err}", file=sys.stderr)
    return code
