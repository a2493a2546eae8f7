"""Peak CUDA memory over a window that opens only after warm-up.

The first calls of a provider compile (torch.compile), autotune (Triton tries every config, each
with its own buffers) and grow the caching allocator. None of that is the memory a step needs, so
a benchmark warms up first and opens the window after: :meth:`PeakMemory.open` synchronises,
notes what is allocated and resets torch's peak counter; :meth:`PeakMemory.peak` is the highest
allocation since. On a machine without CUDA there is no window (:func:`peak_memory` returns None).
"""
from __future__ import annotations

import torch


class PeakMemory:
    """One peak-memory window on a CUDA device."""

    def __init__(self, device: torch.device):
        self.device = device
        self.base: int | None = None  # bytes allocated when the window opened

    def open(self) -> None:
        torch.cuda.synchronize(self.device)  # the warm-up's kernels are done before the counter restarts
        self.base = torch.cuda.memory_allocated(self.device)
        torch.cuda.reset_peak_memory_stats(self.device)

    def peak(self) -> int:
        """The highest allocation (bytes) since :meth:`open`, what was allocated then included."""
        if self.base is None:
            raise RuntimeError("PeakMemory.peak() before open(): the window starts after warm-up")
        torch.cuda.synchronize(self.device)
        return torch.cuda.max_memory_allocated(self.device)

    def added(self) -> int:
        """What the window added on top of what was allocated when it opened (bytes)."""
        return self.peak() - self.base


def peak_memory(device: torch.device | str) -> PeakMemory | None:
    """A window on ``device`` when it is a CUDA device; None elsewhere (no peak is measured)."""
    device = torch.device(device)
    return PeakMemory(device) if device.type == "cuda" else None
