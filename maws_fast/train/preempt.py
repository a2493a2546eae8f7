"""Preemption: SIGTERM / SIGUSR1 (how SLURM and Kubernetes preempt) or Ctrl-C end a stage cleanly.

On a signal the current step finishes, every rank writes its shard of a checkpoint of that step,
and the job exits with :data:`PREEMPTED_EXIT` and one line saying where to resume. SIGINT does the
same the first time; pressed again before the checkpoint is written, it interrupts at once.

The ranks must stop at the same step: a signal can reach one rank only, or reach them at different
steps. So after every step each rank all-reduces (max) the signal it has seen, and acts on the
value of the previous step's all-reduce: on a GPU that copy lands in pinned memory behind an event
a step early, so reading it never waits for the GPU (no host sync per step). One process acts on
its own flag at once.
"""
from __future__ import annotations

import signal
import threading

import torch
import torch.distributed as dist

from maws_fast.errors import UserError
from maws_fast.parallel.mesh import Mesh

PREEMPTED_EXIT = 75  # EX_TEMPFAIL: stopped on request, resumable; run the same command again
SIGNALS = (signal.SIGTERM, signal.SIGUSR1, signal.SIGINT)


class Preempted(UserError):
    """The stage stopped on a signal after checkpointing (the CLI exits with PREEMPTED_EXIT)."""

    exit_code = PREEMPTED_EXIT


class Preemption:
    """Signal handlers for one stage (installed from the main thread only) and the ranks' agreement."""

    def __init__(self, mesh: Mesh, device: torch.device):
        self.mesh, self.device = mesh, device
        self.seen = 0  # the first signal this process received
        self._old: dict = {}
        self._pending = None  # the event (GPU) behind the previous step's all-reduced flag, or True (CPU)
        self._flag = self._host = None  # allocated once: per step only a fill, an all-reduce, a copy
        if threading.current_thread() is threading.main_thread():
            for s in SIGNALS:
                self._old[s] = signal.signal(s, self._handle)

    def _handle(self, signum, frame) -> None:
        if signum == signal.SIGINT and self.seen:
            signal.signal(signal.SIGINT, signal.default_int_handler)
            raise KeyboardInterrupt  # pressed twice: stop now
        self.seen = self.seen or signum

    def poll(self) -> int:
        """After a step: the signal every rank agrees to stop on (0: go on). Collective when distributed."""
        if not self.mesh.distributed:
            return self.seen
        if self._flag is None:
            self._flag = torch.zeros(1, dtype=torch.int32, device=self.device)
            self._host = torch.zeros(1, dtype=torch.int32, pin_memory=self.device.type == "cuda")
        agreed = 0
        if self._pending is not None:
            if self._pending is not True:
                self._pending.synchronize()  # recorded a whole step ago: already complete in practice
            agreed = int(self._host.item())  # host memory: no device sync
        self._flag.fill_(self.seen)  # a scalar fill on the stream: no host-to-device copy to wait for
        dist.all_reduce(self._flag, op=dist.ReduceOp.MAX)
        if self.device.type == "cuda":
            self._host.copy_(self._flag, non_blocking=True)
            self._pending = torch.cuda.Event()
            self._pending.record()
        else:
            self._host.copy_(self._flag)
            self._pending = True
        return agreed

    def agree_now(self) -> int:
        """The signal any rank has seen, now (one blocking collective): at the end of a stage, so a
        signal that came during its last steps still stops the job before the next stage."""
        if not self.mesh.distributed:
            return self.seen
        flag = torch.tensor([self.seen], dtype=torch.int32, device=self.device)
        dist.all_reduce(flag, op=dist.ReduceOp.MAX)
        return int(flag.item())

    def close(self) -> None:
        for s, old in self._old.items():
            signal.signal(s, old)
        self._old = {}


def signal_name(signum: int) -> str:
    return signal.Signals(signum).name
