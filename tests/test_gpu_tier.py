"""scripts/gpu_tier.sh on a CPU: the dry run of both calls holds (every script, test path, carried file and
maws-bench argument exists), it catches a plan that names a missing file, and the real mechanics (steps
under a budget, a failure remembered, one tarball re-packed after every step) run with a stand-in python."""
import os
import shutil
import subprocess
import sys
import tarfile
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "scripts" / "gpu_tier.sh"
FMNIST = Path("/usr/share/datasets/fashion-mnist")
needs_data = pytest.mark.skipif(not (FMNIST / "train-images-idx3-ubyte.gz").exists() and not os.environ.get("CI"),
                                reason="prepare copies Debian's dataset-fashion-mnist into .carry/")


def _run(*args, cwd=REPO, env=None, timeout=120):
    env = {**os.environ, "PYTHON": sys.executable, **(env or {})}
    env.pop("TRITON_INTERPRET", None)
    return subprocess.run(["bash", str(cwd / "scripts" / "gpu_tier.sh"), *args], cwd=cwd, env=env,
                          capture_output=True, text=True, timeout=timeout)


@needs_data
@pytest.mark.parametrize("call, steps", [
    ("first", ["doctor", "kernels_vs_ref", "gpu_tests", "loop_tests", "bench_step", "csrc_tests", "cuda_vs_ref"]),
    ("second", ["bench_step_l16", "memcheck", "memcheck_cuda", "racecheck", "slow_gpu_tests", "bench_kernels",
                "bench_data"]),
    ("third", ["bench_dist_h14", "bench_dist_2b14", "bench_train"]),
])
def test_dry_run_passes(call, steps):
    res = _run("--dry-run", call)
    assert res.returncode == 0, res.stdout + res.stderr
    assert f"gpu_tier --dry-run {call}: OK ({len(steps)} steps" in res.stdout
    planned = [line.removeprefix("would run: ").split(":")[0] for line in res.stdout.splitlines()
               if line.startswith("would run: ")]
    assert planned == steps
    assert (REPO / ".carry" / "fashion-mnist" / "train-images-idx3-ubyte.gz").is_file()


def _copy_tree(dst: Path, drop: str | None = None) -> Path:
    """The files the script plans with, in a fresh folder (optionally without one of them)."""
    for rel in ("scripts/gpu_tier.sh", "benchmarks/sanitize_kernels.py", "kernels/setup.py"):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy(REPO / rel, dst / rel)
    for rel in ("tests/kernels", "tests/models", "tests/train", "tests/csrc", "tests/parallel/test_gpu_engine.py"):
        (dst / rel).parent.mkdir(parents=True, exist_ok=True)
        (dst / rel).mkdir(exist_ok=True) if not rel.endswith(".py") else (dst / rel).write_text("")
    (dst / ".carry" / "fashion-mnist").mkdir(parents=True)
    for f in ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz", "t10k-images-idx3-ubyte.gz",
              "t10k-labels-idx1-ubyte.gz"):
        (dst / ".carry" / "fashion-mnist" / f).write_bytes(b"x")
    if drop:
        p = dst / drop
        shutil.rmtree(p) if p.is_dir() else p.unlink()
    return dst


@pytest.mark.parametrize("drop", ["benchmarks/sanitize_kernels.py", "tests/csrc", "kernels/setup.py"])
def test_dry_run_names_what_is_missing(tmp_path, drop):
    root = _copy_tree(tmp_path / "repo", drop)
    res = _run("--dry-run", "first", cwd=root, env={"PYTHONPATH": str(REPO)})
    assert res.returncode == 1, res.stdout + res.stderr
    assert drop.rsplit("/", 1)[-1] in res.stderr


@needs_data
def test_the_dry_run_prepares_what_the_call_carries(tmp_path):
    root = _copy_tree(tmp_path / "repo", ".carry/fashion-mnist/t10k-labels-idx1-ubyte.gz")
    res = _run("--dry-run", "first", cwd=root, env={"PYTHONPATH": str(REPO)})
    assert res.returncode == 0, res.stdout + res.stderr
    copied = root / ".carry" / "fashion-mnist" / "t10k-labels-idx1-ubyte.gz"
    assert copied.read_bytes() == (FMNIST / "t10k-labels-idx1-ubyte.gz").read_bytes()


def test_a_bench_argument_that_does_not_parse_fails_the_dry_run(tmp_path):
    root = _copy_tree(tmp_path / "repo")
    script = root / "scripts" / "gpu_tier.sh"
    script.write_text(script.read_text().replace("--cases mae:vit_b16", "--casez mae:vit_b16"))
    res = _run("--dry-run", "first", cwd=root, env={"PYTHONPATH": str(REPO)})
    assert res.returncode == 1 and "does not parse" in res.stderr, res.stdout + res.stderr


def test_a_python_module_that_does_not_exist_fails_the_dry_run(tmp_path):
    root = _copy_tree(tmp_path / "repo")
    script = root / "scripts" / "gpu_tier.sh"
    script.write_text(script.read_text().replace("-m maws_fast.cli.doctor", "-m maws_fast.cli.doctorz"))
    res = _run("--dry-run", "first", cwd=root, env={"PYTHONPATH": str(REPO)})
    assert res.returncode == 1, res.stdout + res.stderr
    assert "doctor: python module maws_fast.cli.doctorz does not exist" in res.stderr, res.stderr


FAKE_PY = """#!/bin/bash
# stands in for the GPU machine's python: every command succeeds at once, except the kernel check
case "$*" in
  *is_available*) [ -n "$FAKE_NO_CUDA" ] && exit 3; exit 0 ;;
  *sanitize_kernels.py*) [ -n "$FAKE_HANG" ] && exec sleep 60; echo "FAIL attention bf16: max err 1 (scale 1)"; exit 3 ;;
  *) echo "fake: $*" ;;
esac
"""


def _fake_first(tmp_path, **env):
    """``first`` in a copy of the planned tree, with a stand-in python: (result, summary lines, $OUT)."""
    root = _copy_tree(tmp_path / "repo")
    fake = tmp_path / "fakepy"
    fake.write_text(FAKE_PY)
    fake.chmod(0o755)
    out = tmp_path / "out"
    res = _run("first", cwd=root, env={"PYTHON": str(fake), "OUT": str(out), "GPU_TIER_LOGS": str(tmp_path / "logs"),
                                       **env})
    return res, (out / "summary.txt").read_text().splitlines(), out


def test_first_runs_its_steps_keeps_failures_and_packs_one_tarball(tmp_path):
    res, summary, out = _fake_first(tmp_path)
    assert res.returncode == 1, res.stdout + res.stderr  # the kernel check failed
    lines = {line.split()[0]: line for line in summary if line and not line.startswith("gpu_tier")}
    assert "FAILED" in lines["kernels_vs_ref"] and "rc=3" in lines["kernels_vs_ref"]
    for name in ("gpu_tests", "loop_tests", "bench_step"):
        assert " OK " in lines[name], summary
    assert "FAILED" in lines["build_ext"]  # the stand-in builds no .so ...
    assert "SKIPPED" in lines["csrc_tests"] and "SKIPPED" in lines["cuda_vs_ref"]  # ... so they say why they did not run
    assert summary[-1].startswith("gpu_tier first: FAILED")
    # what comes back from a device call: two files (a call returns at most 8), the logs inside the tarball
    assert sorted(p.name for p in out.iterdir()) == ["gpu_first.tar.gz", "summary.txt"]
    with tarfile.open(out / "gpu_first.tar.gz") as tar:
        names = set(tar.getnames())
    for f in ("env.txt", "kernels_vs_ref.log", "gpu_tests.log", "bench_step.log", "build_ext.log", "summary.txt"):
        assert f"gpu_first/{f}" in names, names


def test_steps_past_the_budget_are_skipped_and_say_so(tmp_path):
    res, summary, _ = _fake_first(tmp_path, GPU_TIER_BUDGET_S="5")
    for name in ("kernels_vs_ref", "gpu_tests", "loop_tests", "bench_step"):
        line = next(x for x in summary if x.startswith(name))
        assert "SKIPPED" in line and "budget spent" in line, summary
    assert res.returncode == 1 and summary[-1].startswith("gpu_tier first: FAILED")  # nothing measured


def test_a_step_past_its_limit_is_a_timeout_and_the_next_step_runs(tmp_path):
    res, summary, _ = _fake_first(tmp_path, GPU_TIER_MAX_STEP_S="2", FAKE_HANG="1")
    line = next(x for x in summary if x.startswith("kernels_vs_ref"))
    assert "TIMEOUT" in line and "rc=124" in line, summary
    assert " OK " in next(x for x in summary if x.startswith("gpu_tests")), summary
    assert res.returncode == 1


def test_no_cuda_on_the_device_is_one_line_and_nothing_runs(tmp_path):
    res, summary, out = _fake_first(tmp_path, FAKE_NO_CUDA="1")
    assert res.returncode == 1
    assert any("torch sees no CUDA device" in x for x in summary), summary
    assert not any(x.startswith(("kernels_vs_ref", "gpu_tests")) for x in summary), summary
    with tarfile.open(out / "gpu_first.tar.gz") as tar:
        assert "gpu_first/env.txt" in tar.getnames()
