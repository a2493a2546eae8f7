"""Triton, or stand-ins that let every kernel module import where Triton is not installed.

Triton ships for Linux only, so on macOS, Windows and CPU-only images without it ``import
maws_kernels`` must still work and every op must run its torch reference. The kernel modules
import ``triton`` and ``tl`` from here instead of from Triton:

* with Triton installed they are the real ``triton`` and ``triton.language``;
* without it they are :class:`_Absent` stand-ins that satisfy what a module does at import time
  (``@triton.jit``, ``@triton.autotune(...)``, ``triton.Config(...)``, ``tl.constexpr(...)``)
  and raise :class:`BackendUnavailableError` naming the missing package the moment a kernel is
  launched (``kernel[grid](...)``). ``resolve_backend`` never picks "triton" without Triton, so a
  launch is only reached by calling a private launcher directly.

``triton.cdiv`` and ``triton.next_power_of_2`` are plain integer helpers and work either way.
"""
from __future__ import annotations

from maws_kernels._backend import TRITON_ERROR, BackendUnavailableError, missing_triton_message


class _Absent:
    """Stands in for any Triton object at import time; a kernel launch raises."""

    __slots__ = ("_name",)

    def __init__(self, name: str):
        self._name = name

    def __getattr__(self, attr: str) -> "_Absent":
        if attr.startswith("__"):
            raise AttributeError(attr)
        return _Absent(f"{self._name}.{attr}")

    def __call__(self, *args, **kwargs) -> "_Absent":
        # ``@triton.jit`` / ``triton.autotune(...)(fn)``: the stand-in is named after the kernel
        if len(args) == 1 and not kwargs and callable(args[0]) and not isinstance(args[0], _Absent):
            return _Absent(getattr(args[0], "__qualname__", self._name))
        return _Absent(self._name)

    def __getitem__(self, grid) -> "_Absent":
        raise BackendUnavailableError(missing_triton_message(f"maws_kernels: the Triton kernel {self._name}"))

    def __repr__(self) -> str:
        return f"<{self._name}: triton is not installed>"


class _AbsentTriton(_Absent):
    __slots__ = ()

    @staticmethod
    def cdiv(a: int, b: int) -> int:
        return -(-a // b)

    @staticmethod
    def next_power_of_2(n: int) -> int:
        return 1 if n <= 1 else 1 << (int(n) - 1).bit_length()


if TRITON_ERROR is None:
    import triton
    import triton.language as tl
else:
    triton = _AbsentTriton("triton")
    tl = _Absent("triton.language")

HAS_TRITON = TRITON_ERROR is None
