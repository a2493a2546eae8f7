"""What the entry points share: the one line a user error ends in, and a quiet exit when the reader of stdout
goes away (``maws-train --help-config | head``)."""
from __future__ import annotations

import functools
import os
import select
import sys

SIGPIPE_EXIT = 141  # 128 + SIGPIPE: what the shell reports for a writer whose reader closed (`yes | head`)


def fail(prog: str, err: Exception) -> int:
    """One line on stderr; exit 2, or the error's own ``exit_code`` (a preempted run: 75, resumable)."""
    code = getattr(err, "exit_code", 2)
    print(f"{prog}: {'error: ' if code == 2 else ''}{err}", file=sys.stderr)
    return code


def _stdout_reader_gone() -> bool:
    """Whether stdout is a pipe whose reading end is closed (poll reports POLLERR on it)."""
    try:
        fd = sys.stdout.fileno()
    except (AttributeError, OSError, ValueError):  # replaced by a capture without a descriptor
        return False
    if not hasattr(select, "poll"):  # no poll (Windows): take the error as stdout's, as before the check
        return True
    poller = select.poll()
    poller.register(fd, select.POLLOUT)
    return any(events & select.POLLERR for _, events in poller.poll(0))


def _flush_stdout() -> None:
    if sys.stdout is not None:  # None: started with no descriptor 1 at all (print() writes nothing then)
        sys.stdout.flush()


def quiet_broken_pipe(main):
    """Wrap an entry point: a closed stdout (``| head``) ends it with exit 141 and nothing on stderr.

    Output still buffered (also before argparse's SystemExit) is flushed inside the wrapper, so the error
    surfaces here and not in the interpreter's own flush at exit. A BrokenPipeError from anything but stdout
    (a data-loader worker, a socket) is raised as before.
    """
    @functools.wraps(main)
    def wrapper(*args, **kwargs):
        try:
            try:
                code = main(*args, **kwargs)
            except SystemExit:  # argparse's --help and usage errors: their output is still buffered
                _flush_stdout()
                raise
            _flush_stdout()
            return code
        except BrokenPipeError:
            if not _stdout_reader_gone():
                raise
            # Python flushes stdout again at exit and would fail again: point the descriptor at devnull.
            devnull = os.open(os.devnull, os.O_WRONLY)
            os.dup2(devnull, sys.stdout.fileno())
            os.close(devnull)
            return SIGPIPE_EXIT

    return wrapper
