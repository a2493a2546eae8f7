"""Stuck-rank detection: a heartbeat per rank through torchrun's store, and a watchdog that ends the job.

Every rank runs a daemon thread that, every ``interval`` seconds, publishes ``<beat> <stage> <step>``
under ``maws/heartbeat/<rank>`` (``beat`` counts the thread's own publications; ``step`` is the last
step the training loop finished, set by :func:`progress`) and reads every other rank's. A rank whose
value has not changed for ``stall_s`` seconds has stopped: its whole process is not running (SIGSTOP,
a dead or frozen host, a GPU wedged so hard the process cannot schedule a thread). The first
watchdog to see it prints one line naming that rank and the step it was at, and ends its own
process with :data:`STALL_EXIT`; torchrun then stops the rest. The collectives themselves would
only fail at ``parallel.timeout_s`` (30 minutes by default).

Checkpoints stay whole: a process ended mid-save leaves only a temp dir, which the next save
clears (the commit protocol of :mod:`maws_fast.parallel.checkpoint`).
"""
from __future__ import annotations

import os
import sys
import threading
import time

import torch.distributed as dist

from maws_fast.parallel.mesh import attempt_store

STALL_EXIT = 76  # a rank stopped making progress; the job was ended by the watchdog
_current: Watchdog | None = None


class Watchdog:
    def __init__(self, store, rank: int, world: int, stall_s: float, interval: float | None = None,
                 exit_fn=os._exit, say=None):
        self.store, self.rank, self.world, self.stall_s = store, rank, world, stall_s
        self.interval = interval if interval is not None else max(0.2, min(5.0, stall_s / 5))
        self.exit_fn = exit_fn
        self.say = say or (lambda msg: print(msg, file=sys.stderr, flush=True))
        self.stage, self.step = "-", 0
        self._beat = 0
        self._stop = threading.Event()
        self._wake = threading.Event()  # set by progress(): publish the new step now, off the main thread
        self._thread = threading.Thread(target=self._run, name="maws-watchdog", daemon=True)

    def start(self) -> Watchdog:
        self._thread.start()
        return self

    def stop(self) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout=10)

    def progress(self, stage: str, step: int) -> None:
        self.stage, self.step = stage, step
        self._wake.set()

    def _publish(self) -> None:
        self._beat += 1
        self.store.set(f"heartbeat/{self.rank}", f"{self._beat} {self.stage} {self.step}")

    def _run(self) -> None:
        seen: dict[int, tuple[bytes | None, float]] = {}
        checked = 0.0
        while not self._stop.is_set():
            now = time.monotonic()
            try:
                self._publish()
                if now - checked < self.interval:  # woken by a step: publish only, read the others on time
                    self._wait()
                    continue
                checked = now
                for r in range(self.world):
                    if r == self.rank:
                        continue
                    key = f"heartbeat/{r}"
                    value = self.store.get(key) if self.store.check([key]) else None
                    last = seen.get(r)
                    if last is None or last[0] != value:
                        seen[r] = (value, now)
                    elif now - last[1] > self.stall_s:
                        self._stalled(r, value, now - last[1])
                        return
            except Exception as e:  # noqa: BLE001 - e.g. the store is gone because the job is ending
                if not self._stop.is_set():
                    self.say(f"maws-train: rank {self.rank}'s watchdog stopped ({type(e).__name__}: {e}); "
                             "stuck ranks are now found by parallel.timeout_s only")
                return
            self._wait()

    def _wait(self) -> None:
        self._wake.wait(self.interval)
        self._wake.clear()

    def _stalled(self, rank: int, value: bytes | None, quiet: float) -> None:
        if value is None:
            where = "before its first heartbeat"
        else:
            _, stage, step = value.decode().split(" ", 2)
            where = f"at step {step} of stage {stage}" if stage != "-" else "before its first step"
        self.say(f"maws-train: rank {rank} stopped making progress {where} (no heartbeat for {quiet:.0f} s, "
                 f"parallel.stall_timeout_s={self.stall_s:g}); rank {self.rank} ends the job (exit {STALL_EXIT}). "
                 f"Completed checkpoints are kept: rerun the same command to resume")
        self.exit_fn(STALL_EXIT)


def start_watchdog(stall_s: float, rank: int, world: int) -> Watchdog | None:
    """Start this rank's watchdog over torchrun's store (MASTER_ADDR / MASTER_PORT, a client of its
    own); None in one process or when ``stall_s`` is 0 (off)."""
    global _current
    if world <= 1 or stall_s <= 0 or "MASTER_PORT" not in os.environ:
        return None
    store = dist.PrefixStore("watchdog", attempt_store(60.0, client_only=True))
    _current = Watchdog(store, rank, world, stall_s).start()
    return _current


def stop_watchdog(dog: Watchdog | None) -> None:
    global _current
    if dog is not None:
        dog.stop()
    if _current is dog:
        _current = None


def progress(stage: str, step: int) -> None:
    """The training loop finished ``step`` of ``stage``: the watchdog thread publishes it at once
    (one store write per step per rank, off the main thread; the others are read every interval)."""
    if _current is not None:
        _current.progress(stage, step)
