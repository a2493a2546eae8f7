"""Backend selection shared by every op.

Order of precedence: the explicit ``backend=`` argument, then the environment variable
``MAWS_KERNELS_BACKEND``, then the best backend implemented for that op on that device.
An explicitly requested backend that cannot run raises; it never silently degrades, because a
benchmark or a parity test that quietly ran the reference would report a lie.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

BACKENDS = ("triton", "cuda", "torch")
ENV_VAR = "MAWS_KERNELS_BACKEND"


class BackendUnavailableError(RuntimeError):
    """The requested backend cannot run this op here (no GPU, not built, not implemented)."""


def _probe_extension() -> str | None:
    """None if ``maws_kernels._C`` imports, else why not.

    Probed once, at import: a per-call import attempt inside ``torch.compile``'d code would make
    Dynamo trace an ImportError and break the graph wherever the extension is not built.
    """
    if importlib.util.find_spec("maws_kernels._C") is None:
        return "no _C*.so next to the package"
    try:
        importlib.import_module("maws_kernels._C")
    except ImportError as e:  # built, but for another torch / CUDA: say what the loader said
        return str(e)
    return None


_EXT_ERROR = _probe_extension()


def extension():
    """The ``maws_kernels._C`` module; call only once the "cuda" backend has been resolved."""
    return importlib.import_module("maws_kernels._C")


def unit_last_stride(t: torch.Tensor) -> torch.Tensor:
    """``t`` itself when its last dim is contiguous (any other strides: kernels take them), else a copy."""
    return t if t.stride(-1) == 1 else t.contiguous()


def _probe_triton() -> str | None:
    """None if triton imports, else why not (probed once, at import, like the extension)."""
    try:
        import triton  # noqa: F401
        import triton.language  # noqa: F401
    except Exception as e:  # not installed, or installed but broken: either way the torch paths run
        return f"{type(e).__name__}: {e}"
    return None


TRITON_ERROR = _probe_triton()


def missing_triton_message(what: str) -> str:
    """One sentence for an error when Triton is needed but cannot be imported."""
    return (f"{what} needs the 'triton' package, which cannot be imported here ({TRITON_ERROR}); "
            "install it where it exists (Linux: pip install triton) or use backend='torch'")


def available_backends(op: str, implemented: tuple[str, ...], device: torch.device | str) -> list[str]:
    """Backends of ``implemented`` that can run ``op`` on ``device``, best first."""
    device = torch.device(device)
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    out = []
    for name in BACKENDS:
        if name not in implemented:
            continue
        if name == "torch":
            out.append(name)
        elif name == "triton" and TRITON_ERROR is None and (device.type == "cuda" or interpreting):
            out.append(name)
        elif name == "cuda" and device.type == "cuda" and _EXT_ERROR is None:
            out.append(name)
    if device.type == "cpu" and "torch" in out:
        # Triton on CPU tensors is the interpreter: a correctness tool, ~1 ms per program. It runs
        # when asked for by name, but the best CPU backend is the torch reference.
        out.remove("torch")
        out.insert(0, "torch")
    return out


def backend_problem(backend: str, device: torch.device | str) -> str | None:
    """Why ``backend`` cannot run ops on ``device`` in this process, or None if it can: a check a
    trainer makes once, before any work, instead of meeting the error at its first forward.

    ``torch`` runs anywhere; ``triton`` needs Triton and a CUDA device (or ``TRITON_INTERPRET=1``,
    the interpreter); ``cuda`` needs a CUDA device and the built ``maws_kernels._C``.
    """
    device = torch.device(device)
    if backend not in BACKENDS:
        return f"unknown backend {backend!r}; choose one of {BACKENDS}"
    if backend == "triton":
        if TRITON_ERROR is not None:
            return f"Triton cannot be imported here ({TRITON_ERROR})"
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            return f"Triton kernels need a CUDA device (or TRITON_INTERPRET=1, the interpreter), not {device.type}"
    if backend == "cuda":
        if device.type != "cuda":
            return f"the CUDA twins need a CUDA device, not {device.type}"
        if _EXT_ERROR is not None:
            return (f"the CUDA extension maws_kernels._C cannot be loaded ({_EXT_ERROR}); build it on a CUDA "
                    "machine with: pip install --no-build-isolation -e ./kernels")
    return None


def resolve_backend(
    op: str, backend: str | None, implemented: tuple[str, ...], device: torch.device | str
) -> str:
    """Pick the backend for one call of ``op``.

    Args:
        op: op name, for error messages.
        backend: explicit choice, or None to consult ``MAWS_KERNELS_BACKEND`` then pick the best.
        implemented: backends this op has an implementation for.
        device: device of the op's inputs.

    Returns:
        One of :data:`BACKENDS`.

    Raises:
        ValueError: ``backend`` is not a known name.
        BackendUnavailableError: the requested backend cannot run ``op`` on ``device``.
    """
    requested = backend if backend is not None else os.environ.get(ENV_VAR) or None
    usable = available_backends(op, implemented, device)
    if requested is None:
        return usable[0]
    if requested not in BACKENDS:
        src = "backend argument" if backend is not None else f"env {ENV_VAR}"
        raise ValueError(f"maws_kernels: unknown backend {requested!r} ({src}); choose one of {BACKENDS}")
    if requested not in usable:
        if requested not in implemented:
            why = f"{op} has no {requested!r} implementation yet (implemented: {implemented})"
        elif requested == "cuda" and torch.device(device).type != "cuda":
            why = f"the tensors are on {torch.device(device)}, not a GPU"
        elif requested == "cuda":
            why = (f"the CUDA extension maws_kernels._C cannot be loaded ({_EXT_ERROR}); build it on a CUDA "
                   "machine with: pip install --no-build-isolation -e ./kernels")
        elif requested == "triton" and TRITON_ERROR is not None:
            raise BackendUnavailableError(missing_triton_message(f"maws_kernels.{op}: backend 'triton'"))
        else:
            why = f"it needs a CUDA device (or TRITON_INTERPRET=1), got {torch.device(device)}"
        raise BackendUnavailableError(f"maws_kernels.{op}: backend {requested!r} is unavailable: {why}")
    return requested
