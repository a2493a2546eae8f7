"""scripts/setup.sh --cuda --dry-run against canned nvidia-smi outputs.

Each test runs the script from a temp copy of scripts/ and requirements/ (setup.sh cds to the
folder above its own), so nothing here can create or change the repository's .venv.
"""
import os
import shutil
import stat
import subprocess
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
HEADER = "| NVIDIA-SMI {drv}    Driver Version: {drv}    CUDA Version: {cuda}     |"


@pytest.fixture
def tree(tmp_path):
    for name in ("scripts", "requirements"):
        shutil.copytree(REPO / name, tmp_path / name)
    return tmp_path


def fake_smi(tree: Path, drv: str, cuda: str) -> Path:
    smi = tree / "nvidia-smi"
    smi.write_text(f"#!/bin/sh\necho '{HEADER.format(drv=drv, cuda=cuda)}'\n")
    smi.chmod(smi.stat().st_mode | stat.S_IXUSR)
    return smi


def setup_sh(tree: Path, *args: str, smi: str) -> subprocess.CompletedProcess:
    venv_before = _stat(REPO / ".venv")
    env = dict(os.environ, NVIDIA_SMI=smi)
    out = subprocess.run(["bash", str(tree / "scripts" / "setup.sh"), *args], env=env,
                         capture_output=True, text=True, timeout=60)
    # A dry run installs nothing: no .venv in the copy, the repository's own untouched.
    assert not (tree / ".venv").exists()
    assert _stat(REPO / ".venv") == venv_before
    return out


def _stat(p: Path):
    return (p.stat().st_mtime_ns, sorted(os.listdir(p))) if p.exists() else None


def commands(out: str) -> list:
    return [line[2:] for line in out.splitlines() if line.startswith("+ ")]


def test_cuda12_driver_plans_cuda12_torch_dali120_and_xformers(tree):
    out = setup_sh(tree, "--cuda", "--dry-run", smi=str(fake_smi(tree, "550.54.15", "12.4")))
    assert out.returncode == 0, out.stderr
    assert "CUDA 12.4 -> requirements/cuda12.txt" in out.stdout
    assert "torch 2.10.0" in out.stdout and "CUDA 12.8 build" in out.stdout
    assert "DALI wheel nvidia-dali-cuda120==2.4.0" in out.stdout
    cmds = commands(out.stdout)
    # torch goes in first and alone, from the CUDA requirements file.
    assert cmds[cmds.index("python3 -m venv .venv") + 1].endswith("-c requirements/cuda12.txt torch triton")
    assert all("cpu.txt" not in c and "cuda13" not in c and "cuda130" not in c for c in cmds)
    assert any(c.endswith(" nvidia-dali-cuda120") for c in cmds)
    assert any(c.endswith(" xformers") for c in cmds)
    assert any(c.endswith("-e .") for c in cmds)


def test_cuda12_dev_swaps_the_cuda130_dali_that_the_dev_extra_names(tree):
    out = setup_sh(tree, "--cuda", "--dev", "--dry-run", smi=str(fake_smi(tree, "550.54.15", "12.4")))
    assert out.returncode == 0, out.stderr
    cmds = commands(out.stdout)
    dev = next(i for i, c in enumerate(cmds) if c.endswith("-e .[dev]"))
    assert cmds[dev + 1] == ".venv/bin/pip uninstall -y -q nvidia-dali-cuda130"
    assert cmds[dev + 2].endswith("-c requirements/cuda12.txt nvidia-dali-cuda120")


def test_cuda13_driver_plans_cuda13_torch_dali130_and_skips_xformers(tree):
    out = setup_sh(tree, "--dry-run", "--cuda", "--dev", smi=str(fake_smi(tree, "580.65.06", "13.0")))
    assert out.returncode == 0, out.stderr
    assert "CUDA 13.0 -> requirements/cuda13.txt" in out.stdout
    assert "torch 2.13.0" in out.stdout and "CUDA 13.0 build" in out.stdout and "triton 3.7.1" in out.stdout
    assert "DALI wheel nvidia-dali-cuda130==2.4.0" in out.stdout
    assert sum("xformers skipped" in line for line in out.stdout.splitlines()) == 1
    cmds = commands(out.stdout)
    assert any(c.endswith("-c requirements/cuda13.txt torch triton") for c in cmds)
    assert all("xformers" not in c and "uninstall" not in c and "cpu.txt" not in c for c in cmds)


def test_cuda_pins_rule_out_a_local_cpu_torch():
    for name in ("cuda12.txt", "cuda13.txt"):
        lines = (REPO / "requirements" / name).read_text().splitlines()
        assert any(line.startswith("torch===") for line in lines), name


def test_too_old_driver_is_one_error_naming_the_minimum(tree):
    out = setup_sh(tree, "--cuda", "--dry-run", smi=str(fake_smi(tree, "520.61.05", "11.8")))
    assert out.returncode == 2
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1
    assert "CUDA 11.8" in out.stderr and "CUDA 12.0" in out.stderr and "525.60.13" in out.stderr


def test_missing_nvidia_smi_is_one_line_exit_2(tree):
    out = setup_sh(tree, "--cuda", "--dry-run", smi=str(tree / "no-such-nvidia-smi"))
    assert out.returncode == 2
    assert out.stdout == ""
    assert len(out.stderr.strip().splitlines()) == 1 and "nvidia-smi" in out.stderr


def test_without_cuda_the_plan_is_the_cpu_one(tree):
    out = setup_sh(tree, "--dev", "--dry-run", smi=str(tree / "no-such-nvidia-smi"))
    assert out.returncode == 0, out.stderr
    cmds = commands(out.stdout)
    assert cmds[-4:] == [
        ".venv/bin/pip install -q --disable-pip-version-check -c requirements/cpu.txt torch triton",
        ".venv/bin/pip install -q --disable-pip-version-check -c requirements/cpu.txt -e ./kernels",
        ".venv/bin/pip install -q --disable-pip-version-check -c requirements/cpu.txt -e .[dev]",
        ".venv/bin/python -c import torch, maws_fast, maws_kernels; print('setup: ok, torch', torch.__version__)",
    ]
