"""maws-train under torchrun (gloo, CPU): the same result as one process, and clean failures.

These run the real command line in subprocesses: ``python -m torch.distributed.run --standalone
--nproc_per_node=2 ...`` is what the README tells users to run (``torchrun``).
"""
from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

from tests.conftest import FMNIST_ROOT, needs_fmnist

REPO = Path(__file__).resolve().parents[2]
ARGS = ["--model.preset=tiny", "--run.stages=[mae]", "--mae.epochs=0.03", "--mae.batch_size=256",
        "--mae.warmup_epochs=0.01", "--run.progress=false", "--run.log_every=2", "--run.ckpt_every=2",
        f"--data.root={FMNIST_ROOT}", "--model.attn_backend=manual"]


def torchrun(script: list[str], args: list[str], nproc: int = 2, env: dict | None = None, timeout: int = 300,
             launcher: tuple[str, ...] = ()):
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}", *launcher,
           *script, *args]
    full_env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO), **(env or {})}
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=full_env, cwd=REPO)


def one_process(args: list[str]):
    cmd = [sys.executable, "-c", "import sys; from maws_fast.cli.train import train_main; sys.exit(train_main(sys.argv[1:]))",
           *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=300,
                          env={**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}, cwd=REPO)


def final_weights(out: Path) -> dict:
    from safetensors.torch import load_file

    return load_file(str(out / "mae" / "final" / "model.safetensors"))


@needs_fmnist
@pytest.mark.parametrize("layout", [["--parallel.zero_stage=3"], ["--parallel.tp=2", "--parallel.zero_stage=2"]],
                         ids=["zero3", "tp2"])
def test_torchrun_mae_matches_one_process(tmp_path, layout):
    """Two ranks each read half of every global batch (and draw its masks): same weights as one process."""
    ref = one_process([*ARGS, f"--run.out_dir={tmp_path / 'one'}"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    got = torchrun(["-m", "maws_fast.cli"], [*ARGS, *layout, f"--run.out_dir={tmp_path / 'two'}"])
    assert got.returncode == 0, got.stderr[-3000:]
    a, b = final_weights(tmp_path / "one"), final_weights(tmp_path / "two")
    assert set(a) == set(b) and "blocks.0.attn.qkv.weight" in b
    for k in a:
        assert a[k].shape == b[k].shape, k
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=2e-5, msg=k)  # 7 AdamW steps at lr 1.5e-4
    assert b["blocks.0.attn.qkv.weight"].shape == (384, 128)  # consolidated: full TP shape, timm keys
    assert (tmp_path / "two" / "mae" / "metrics.jsonl").read_text().count("\n") == 4  # one log: rank 0's


def _complete_checkpoints(ckpt_dir: Path) -> list[str]:
    """Every visible checkpoint must be whole: meta.json and each rank's shard, sizes as recorded."""
    from maws_fast.parallel.checkpoint import consolidate

    names = []
    for d in sorted(p for p in ckpt_dir.iterdir() if not p.name.startswith(".")):
        consolidate(d)  # raises CheckpointError on a missing or truncated file
        names.append(d.name)
    return names


@needs_fmnist
def test_a_rank_that_raises_ends_the_job_with_its_error(tmp_path):
    t0 = time.monotonic()
    got = torchrun(["tests/parallel/fault_job.py"], [*ARGS, f"--run.out_dir={tmp_path}"], env={"FAULT": "step"})
    assert got.returncode != 0
    assert "simulated failure on rank 1 at step 3" in got.stderr + got.stdout
    assert time.monotonic() - t0 < 240  # rank 0 did not wait out the collective timeout
    assert _complete_checkpoints(tmp_path / "mae" / "ckpt") == ["step_00000002"]
    assert not (tmp_path / "mae" / "final").exists()


@needs_fmnist
def test_a_failed_shard_write_leaves_no_torn_checkpoint(tmp_path):
    got = torchrun(["tests/parallel/fault_job.py"], [*ARGS, f"--run.out_dir={tmp_path}"], env={"FAULT": "save"})
    assert got.returncode != 0
    err = got.stderr + got.stdout
    assert "No space left on device" in err and "step_00000004" in err
    assert _complete_checkpoints(tmp_path / "mae" / "ckpt") == ["step_00000002"]
    # and the run resumes from it (at another world size: resharded) to the end
    again = one_process([*ARGS, f"--run.out_dir={tmp_path}"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "step_00000002" in again.stdout
    assert (tmp_path / "mae" / "final" / "model.safetensors").exists()


@needs_fmnist
def test_sigterm_on_one_rank_checkpoints_every_rank_at_one_step_and_resumes_exactly(tmp_path):
    """Preemption reaching rank 1 only, during step 3 (index): the ranks agree one poll later, both
    finish step 5, write its checkpoint and exit 75 with one line; the resumed job ends with the weights
    of an uninterrupted 2-rank job, bit for bit."""
    args = [*ARGS, "--run.ckpt_every=100"]
    ref = torchrun(["tests/parallel/fault_job.py"], [*args, f"--run.out_dir={tmp_path / 'ref'}"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "run"
    got = torchrun(["tests/parallel/fault_job.py"], [*args, f"--run.out_dir={out}"], env={"FAULT": "sigterm"})
    assert got.returncode != 0
    err = got.stderr + got.stdout
    assert "stopped by SIGTERM after step 5/8" in err and "exitcode: 75" in err
    assert _complete_checkpoints(out / "mae" / "ckpt") == ["step_00000005"]
    again = torchrun(["tests/parallel/fault_job.py"], [*args, f"--run.out_dir={out}"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout and "step 5/8" in again.stdout
    wa, wb = final_weights(tmp_path / "ref"), final_weights(out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@needs_fmnist
def test_an_elastic_restart_resumes_by_itself_to_the_uninterrupted_weights(tmp_path):
    """torchrun --max-restarts=1: rank 1 is SIGKILLed mid-run; torchrun restarts both workers, they
    take over the job's own lock, resume from the last complete checkpoint (step 2) and finish with
    the weights of an uninterrupted job, bit for bit."""
    ref = torchrun(["tests/parallel/fault_job.py"], [*ARGS, f"--run.out_dir={tmp_path / 'ref'}"])
    assert ref.returncode == 0, ref.stderr[-3000:]
    out = tmp_path / "run"
    got = torchrun(["tests/parallel/fault_job.py"], [*ARGS, f"--run.out_dir={out}"], env={"FAULT": "kill"},
                   launcher=("--max-restarts=1",))
    assert got.returncode == 0, (got.stdout + got.stderr)[-4000:]
    assert "resuming from" in got.stdout and "step_00000002" in got.stdout
    wa, wb = final_weights(tmp_path / "ref"), final_weights(out)
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)


@needs_fmnist
def test_a_stopped_rank_is_named_and_the_job_ends_within_the_stall_timeout(tmp_path):
    """SIGSTOP on rank 1 during step 3: rank 0's watchdog sees rank 1's heartbeat stop, names it and
    its step, and ends the job (exit 76) long before the 30-minute collective timeout; the
    checkpoints written before are complete, and the job resumes from them."""
    out = tmp_path / "run"
    t0 = time.monotonic()
    got = torchrun(["tests/parallel/fault_job.py"], [*ARGS, f"--run.out_dir={out}", "--parallel.stall_timeout_s=4"],
                   env={"FAULT": "stop"}, timeout=200)
    elapsed = time.monotonic() - t0
    err = got.stderr + got.stdout
    assert got.returncode != 0
    assert "rank 1 stopped making progress at step 3 of stage mae" in err and "(exit 76)" in err, err[-3000:]
    assert elapsed < 90  # detection ~4 s, then torchrun's SIGTERM -> SIGKILL of the stopped rank
    assert _complete_checkpoints(out / "mae" / "ckpt") == ["step_00000002"]
    again = one_process([*ARGS, f"--run.out_dir={out}"])
    assert again.returncode == 0, again.stderr[-3000:]
    assert "resuming from" in again.stdout
