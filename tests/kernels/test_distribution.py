"""maws_kernels as a distribution of its own: importable and working without Triton, its metadata
consistent, nothing of the trainer inside. (CI also builds the wheel and runs the smoke test in a
clean venv without the trainer or Triton: scripts/check_kernels_dist.sh.)"""
import importlib.metadata
import os
import subprocess
import sys
import tomllib
from pathlib import Path

import maws_kernels

ROOT = Path(__file__).resolve().parents[2]
SMOKE = Path(__file__).with_name("smoke_dist.py")
# A fresh interpreter in which `import triton` fails, as on a machine without it.
_BLOCK_TRITON = ("import runpy, sys; sys.modules['triton'] = None; sys.argv = [{path!r}, *sys.argv[1:]]; "
                 "runpy.run_path({path!r}, run_name='__main__')")


def _run_without_triton(*args: str) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    return subprocess.run([sys.executable, "-c", _BLOCK_TRITON.format(path=str(SMOKE)), *args], env=env,
                          capture_output=True, text=True, timeout=300)


def test_every_op_and_module_runs_without_triton():
    r = _run_without_triton("--expect-no-triton")
    assert r.returncode == 0, r.stdout + r.stderr
    assert "triton absent: the triton backend raises" in r.stdout


def test_smoke_with_triton_present():
    r = subprocess.run([sys.executable, str(SMOKE)], capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "triton present" in r.stdout


def test_missing_triton_error_names_the_package():
    code = ("import sys; sys.modules['triton'] = None\n"
            "import torch, maws_kernels as mk\n"
            "for call in (lambda: mk.layer_norm(torch.ones(2, 4), None, None, backend='triton'),\n"
            "             lambda: mk.nn.Attention(8, 2, backend='triton')(torch.ones(1, 3, 8)),\n"
            "             lambda: mk.FusedAdamW([torch.nn.Parameter(torch.ones(3))], backend='triton').step()):\n"
            "    try:\n"
            "        call()\n"
            "    except mk.BackendUnavailableError as e:\n"
            "        print('raised:', e)\n")
    env = {**os.environ, "TRITON_INTERPRET": "1"}  # even the interpreter needs the package
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=300)
    assert r.returncode == 0, r.stderr
    lines = [l for l in r.stdout.splitlines() if l.startswith("raised:")]
    assert len(lines) == 3, r.stdout
    assert all("'triton' package" in l and "backend='torch'" in l for l in lines), lines


def test_metadata_is_consistent():
    meta = tomllib.loads((ROOT / "kernels" / "pyproject.toml").read_text())["project"]
    assert meta["name"] == "maws-kernels" and meta["version"] == maws_kernels.__version__
    assert any(d.startswith("torch") for d in meta["dependencies"])
    assert any(d.startswith("triton") and "platform_system == 'Linux'" in d for d in meta["dependencies"])
    assert (ROOT / "kernels" / "LICENSE").read_text() == (ROOT / "LICENSE").read_text()
    assert "BSD 3-Clause" in (ROOT / "LICENSE").read_text()
    # the installed trainer's metadata (what pip resolves), not the source of setup.py
    requires = importlib.metadata.requires("maws_fast") or []
    assert f"maws-kernels=={maws_kernels.__version__}" in requires, requires
    files = importlib.metadata.files("maws_fast") or []
    assert not any(str(f).startswith("maws_kernels/") for f in files), "the trainer ships a copy of the kernels"
