"""``maws-doctor``: does this machine work? What a new GPU user runs before a long run.

    maws-doctor                        # versions, device, backends, every kernel once (under a minute)
    maws-doctor --json doctor.json     # the same, also as one JSON object
    maws-doctor --skip-kernels         # everything but the kernel checks (seconds)

It prints, compactly: the versions of Python, torch (its CUDA and cuDNN), Triton, and of the optional
packages (nvidia-dali, xformers, timm, liger-kernel; "not installed" where missing, and why not where one
is installed but does not import), maws_kernels and whether its CUDA extension ``_C`` is built; the device
(name, compute capability, SMs, memory, the driver from nvidia-smi); every kernel backend and attention
backend the config can name, usable or not and why not (``maws_kernels.backend_problem``); then every
fused kernel once, forward and every gradient, against its reference at small shapes
(:mod:`maws_kernels.selfcheck`), one line per op and backend; and a verdict line.

On a GPU the compiled kernels run in this process, each autotuned kernel pinned to one config (a check
of correctness, not a search for speed). Without a CUDA device the Triton kernels run under Triton's
interpreter on CPU tensors, in a fresh Python started with ``TRITON_INTERPRET=1`` (it must be set before
the kernels are imported): that checks the kernels' code, not their GPU compile, and the output says so.

Exit 0 when everything checked passed, 1 when a kernel check failed; a user error (``--device cuda``
without a CUDA device, a ``--json`` path in a missing directory) is one line and exit 2.
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

from maws_fast.cli.common import fail, quiet_broken_pipe
from maws_fast.errors import UserError

PROG = "maws-doctor"
# (label, distribution names, module): the optional packages a run may use
OPTIONAL = (
    ("triton", ("triton",), "triton"),
    ("nvidia-dali", ("nvidia-dali-*",), "nvidia.dali"),  # one distribution per CUDA major (-cuda120, -cuda130)
    ("xformers", ("xformers",), "xformers"),
    ("timm", ("timm",), "timm"),
    ("liger-kernel", ("liger-kernel", "liger_kernel"), "liger_kernel"),
)


def _dist_version(names: tuple[str, ...]) -> tuple[str | None, str | None]:
    """(version, distribution name) of the first installed distribution matching ``names`` (a trailing ``*``
    matches a prefix), or (None, None)."""
    for name in names:
        if name.endswith("*"):
            prefix = name[:-1].replace("_", "-").lower()
            for d in importlib.metadata.distributions():
                dn = (d.metadata["Name"] or "").replace("_", "-").lower()
                if dn.startswith(prefix):
                    return d.version, dn
            continue
        try:
            return importlib.metadata.version(name), name
        except importlib.metadata.PackageNotFoundError:
            continue
    return None, None


def package(label: str, names: tuple[str, ...], module: str) -> dict:
    """One package: {"version", "distribution", "problem"} (version None: not installed; problem: why an
    installed one does not import)."""
    version, dist = _dist_version(names)
    problem = None
    try:
        mod = importlib.import_module(module)
        version = version or getattr(mod, "__version__", None) or "unknown version"
    except ImportError as e:
        if version is not None:  # installed, but broken here
            problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    except Exception as e:  # noqa: BLE001 - an installed package that fails at import (built for another torch)
        problem = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
    return {"version": version, "distribution": dist if dist not in (None, label) else None, "problem": problem}


def versions() -> dict:
    """Every version the doctor reports, with what does not import and why."""
    import torch

    import maws_fast
    import maws_kernels
    from maws_kernels.selfcheck import extension_problem

    cudnn = torch.backends.cudnn.version() if torch.backends.cudnn.is_available() else None
    out = {"python": {"version": platform.python_version(), "executable": sys.executable},
           "torch": {"version": torch.__version__, "cuda": torch.version.cuda, "cudnn": cudnn}}
    for label, names, module in OPTIONAL:
        out[label] = package(label, names, module)
    out["maws_kernels"] = {"version": maws_kernels.__version__, "extension": extension_problem(),
                           "path": str(Path(maws_kernels.__file__).parent)}
    out["maws_fast"] = {"version": maws_fast.__version__}
    return out


def _nvidia_smi(index: int | None) -> tuple[str | None, str | None]:
    """(driver version, None) from nvidia-smi, or (None, why not)."""
    exe = shutil.which("nvidia-smi")
    if exe is None:
        return None, "nvidia-smi not found"
    cmd = [exe, "--query-gpu=driver_version", "--format=csv,noheader"] + ([] if index is None else ["-i", str(index)])
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=15)
    except (OSError, subprocess.TimeoutExpired) as e:
        return None, f"nvidia-smi failed: {type(e).__name__}"
    lines = r.stdout.strip().splitlines()
    if r.returncode != 0 or not lines:
        return None, f"nvidia-smi exited {r.returncode}: {(r.stderr or r.stdout).strip().splitlines()[:1]}"
    return lines[0].strip(), None


def _cpu_name() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def device_info(device: str) -> dict:
    """What the checks run on: a GPU's name, compute capability, SMs, memory and driver; the CPU otherwise,
    with why there is no CUDA device."""
    import torch

    dev = torch.device(device)
    info: dict = {"device": str(dev), "cuda_devices": torch.cuda.device_count() if torch.cuda.is_available() else 0}
    if dev.type == "cuda":
        idx = dev.index if dev.index is not None else torch.cuda.current_device()
        p = torch.cuda.get_device_properties(idx)
        info.update(name=p.name, capability=f"{p.major}.{p.minor}", sms=p.multi_processor_count,
                    memory_gib=round(p.total_memory / 2**30, 1))
        info["driver"], info["driver_problem"] = _nvidia_smi(idx)
        return info
    info.update(name=_cpu_name(), cores=os.cpu_count())
    info["driver"], info["driver_problem"] = _nvidia_smi(None)
    if torch.version.cuda is None:
        info["no_cuda"] = f"this torch ({torch.__version__}) is a CPU-only build"
    elif not torch.cuda.is_available():
        info["no_cuda"] = f"torch (CUDA {torch.version.cuda}) sees no CUDA device"
    return info


def backends(device: str) -> dict:
    """Each kernel backend and attention backend on ``device``: None where usable, else why not."""
    import maws_kernels
    from maws_fast.config import ATTN_BACKENDS
    from maws_kernels.nn import attention_backend_problem

    return {"kernels": {b: maws_kernels.backend_problem(b, device) for b in maws_kernels.BACKENDS},
            "attention": {b: attention_backend_problem(b, device) for b in ATTN_BACKENDS}}


def _ratio(row: dict) -> float:
    """A check's error as a fraction of what it allows (above 1: failed)."""
    allowed = row.get("rel_tol", 0.0) * row.get("scale", 0.0)
    err = row.get("max_err", float("nan"))
    if err != err:
        return float("inf")
    return err / allowed if allowed > 0 else (0.0 if err == 0 else float("inf"))


def kernel_lines(rows: list[dict]) -> list[str]:
    """One line per op and backend (its checks, its worst error), then each failed check in full."""
    groups: dict[tuple[str, str], list[dict]] = {}
    for r in rows:
        groups.setdefault((r.get("op") or r["check"], r.get("backend") or ""), []).append(r)
    lines = []
    for (op, be), rs in groups.items():
        bad = [r for r in rs if not r["ok"]]
        measured = [r for r in rs if "max_err" in r]
        worst = max(measured, key=_ratio) if measured else None
        err = f"max err {worst['max_err']:.2g} ({_ratio(worst):.2f} of allowed)" if worst else ""
        verdict = f"{len(bad)} of {len(rs)} checks FAILED" if bad else f"{len(rs):>3} checks"
        lines.append(f"  {'ok  ' if not bad else 'FAIL'} {op:<33} {be:<7} {verdict}  {err}".rstrip())
        for r in bad:
            what = r.get("error") or f"max err {r['max_err']:.3g} > {r['rel_tol']:.2g} x scale {r['scale']:.3g}"
            lines.append(f"         {r['check']}: {what}")
    return lines


def _version_lines(v: dict) -> list[str]:
    t = v["torch"]
    lines = [f"  {'python':<13} {v['python']['version']} ({v['python']['executable']})",
             f"  {'torch':<13} {t['version']} (CUDA {t['cuda'] or 'none'}, cuDNN {t['cudnn'] or 'none'})"]
    for label, _, _ in OPTIONAL:
        p = v[label]
        text = "not installed" if p["version"] is None else p["version"]
        if p["distribution"]:
            text += f" ({p['distribution']})"
        if p["problem"]:
            text += f", but does not import: {p['problem']}"
        lines.append(f"  {label:<13} {text}")
    k = v["maws_kernels"]
    ext = "_C built" if k["extension"] is None else f"_C not built ({k['extension']})"
    lines.append(f"  {'maws_kernels':<13} {k['version']}, {ext}")
    lines.append(f"  {'maws_fast':<13} {v['maws_fast']['version']}")
    return lines


def _device_lines(d: dict) -> list[str]:
    if "capability" in d:
        lines = [f"  {d['device']}: {d['name']}, compute capability {d['capability']}, {d['sms']} SMs, "
                 f"{d['memory_gib']} GiB ({d['cuda_devices']} CUDA device(s) visible)"]
    else:
        lines = [f"  {d['device']}: {d['name']}, {d['cores']} cores; no CUDA device"
                 + (f": {d['no_cuda']}" if d.get("no_cuda") else " used")]
    lines.append(f"  driver {d['driver']}" if d["driver"] else f"  driver: {d['driver_problem']}")
    return lines


def _backend_lines(b: dict) -> list[str]:
    lines = []
    for kind, label in (("kernels", "kernel"), ("attention", "attention")):
        for name, why in b[kind].items():
            lines.append(f"  {label:<9} {name:<8} {'yes' if why is None else 'no:  ' + why}")
    return lines


def _write(path: str | None, report: dict) -> None:
    if path:
        from maws_fast.storage import atomic_write_text

        atomic_write_text(path, json.dumps(report, indent=1, default=str) + "\n")


def _parse(argv: list[str] | None) -> argparse.Namespace:
    from maws_kernels.selfcheck import SECTIONS

    p = argparse.ArgumentParser(prog=PROG, description=__doc__.split("\n")[0])
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda if there is one, else cpu)")
    p.add_argument("--json", default=None, metavar="PATH", help="also write everything as one JSON object here "
                                                                "(atomically; written again once the kernels ran)")
    p.add_argument("--skip-kernels", action="store_true", help="report the environment only: run no kernel")
    p.add_argument("--sections", default=None,
                   help=f"comma-separated subset of the kernel checks: {','.join(SECTIONS)} (default: all)")
    return p.parse_args(argv)


def _check_args(args: argparse.Namespace) -> str:
    """The device to check; a mistake is a UserError (one line, exit 2)."""
    import torch

    from maws_kernels.selfcheck import SECTIONS

    device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    try:
        dev = torch.device(device)
    except RuntimeError:
        raise UserError(f"--device {device!r} is not a device; use cuda, cuda:N or cpu") from None
    if dev.type not in ("cuda", "cpu"):
        raise UserError(f"--device {device!r}: the doctor checks cuda or cpu devices")
    if dev.type == "cuda":
        if not torch.cuda.is_available():
            why = "this torch is a CPU-only build" if torch.version.cuda is None else "torch sees no CUDA device"
            raise UserError(f"--device {device}: no CUDA device here ({why}); run without --device to check the CPU")
        if dev.index is not None and dev.index >= torch.cuda.device_count():
            raise UserError(f"--device {device}: only {torch.cuda.device_count()} CUDA device(s) are visible")
    if args.sections:
        unknown = sorted(set(args.sections.split(",")) - set(SECTIONS))
        if unknown:
            raise UserError(f"--sections: unknown {', '.join(unknown)}; choose from {','.join(SECTIONS)}")
    if args.json and not Path(args.json).resolve().parent.is_dir():
        raise UserError(f"--json {args.json}: its directory does not exist")
    return device


@quiet_broken_pipe
def doctor_main(argv: list[str] | None = None) -> int:
    """maws-doctor [--device D] [--json PATH] [--skip-kernels] [--sections A,B]: see the module docstring."""
    t0 = time.monotonic()
    args = _parse(argv)
    try:
        device = _check_args(args)
    except UserError as e:
        return fail(PROG, e)

    report = {"versions": versions(), "device": device_info(device), "backends": backends(device), "kernels": None}
    print(f"{PROG}: does this machine work?")
    print("versions")
    print("\n".join(_version_lines(report["versions"])))
    print("device")
    print("\n".join(_device_lines(report["device"])))
    print(f"backends on {device}")
    print("\n".join(_backend_lines(report["backends"])))
    warnings = [f"{label} does not import" for label, _, _ in OPTIONAL if report["versions"][label]["problem"]]
    if report["device"].get("capability"):  # on a GPU, a kernel backend that cannot run is worth a word
        warnings += [f"kernel backend {b} cannot run" for b, why in report["backends"]["kernels"].items() if why]
    report["warnings"] = warnings

    ok = True
    if args.skip_kernels:
        print("kernels: skipped (--skip-kernels)")
        checked = "the environment only (--skip-kernels)"
    else:
        from maws_kernels.selfcheck import how_it_runs, run_selfcheck

        sections = args.sections.split(",") if args.sections else None
        note = how_it_runs(device)[2]
        report["kernels"] = {"size": "small", "status": "running", "note": note, "rows": []}
        _write(args.json, report)  # what is known so far, should the kernels hang past a caller's timeout
        print("kernels vs their references (small shapes; forward and every gradient)")
        if note:
            print(f"  {note}")
        sys.stdout.flush()  # the checks take a while: show what is running first
        result = run_selfcheck(device, size="small", sections=sections, pin=True, echo=None)
        ok = result.ok
        report["kernels"].update(status="done", interpreted=result.interpreted, rows=result.rows)
        print("\n".join(kernel_lines(result.rows)))
        bad = sum(not r["ok"] for r in result.rows)
        how = " (Triton under the interpreter)" if result.interpreted else ""
        checked = (f"{len(result.rows)} kernel checks passed on {device}{how}" if ok else
                   f"{bad} of {len(result.rows)} kernel checks FAILED on {device}{how}")
    seconds = time.monotonic() - t0
    verdict = f"{'OK' if ok else 'FAIL'}: {checked} in {seconds:.0f} s"
    if warnings:
        verdict += f"; warnings: {', '.join(warnings)}"
    report.update(ok=ok, verdict=verdict, seconds=round(seconds, 1))
    _write(args.json, report)
    print(f"verdict: {verdict}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(doctor_main())
