"""maws-doctor on this machine's CPU, for real, in fresh Pythons: it names the versions, the device, every
backend and why one cannot run, runs every kernel against its reference (the Triton kernels under the
interpreter in a Python of their own), writes the same as one JSON object, exits 1 when a kernel disagrees
with its reference, and ends a user's mistake in one line with exit 2."""
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import maws_kernels
from maws_fast.config import ATTN_BACKENDS

REPO = Path(__file__).resolve().parents[1]
OPS = ("masked_patchify", "norm_pix_loss", "bias_gelu", "layer_norm", "add_layer_norm", "soft_target_cross_entropy",
       "linear_soft_target_cross_entropy", "contrastive_loss", "attention", "attention_varlen", "fused_adamw_",
       "fused_adamw_multi_")
INTERPRETER_NOTE = "Triton kernels checked under the interpreter on CPU — this checks the code, not the GPU compile"


def _doctor(*args, code=None, interpret=False, timeout=300):
    """maws-doctor in a fresh Python (``code`` runs first, in that Python, when given)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}  # conftest set it for this process
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    main = "import sys; from maws_fast.cli.doctor import doctor_main; sys.exit(doctor_main(sys.argv[1:]))"
    cmd = [sys.executable, "-c", f"{code}\n{main}", *args] if code else [sys.executable, "-m", "maws_fast.cli.doctor",
                                                                         *args]
    return subprocess.run(cmd, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


@pytest.mark.slow
def test_a_cpu_run_names_everything_and_checks_every_kernel(tmp_path):
    pytest.importorskip("triton")
    out = tmp_path / "doctor.json"
    r = _doctor("--device", "cpu", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    text = r.stdout
    for label in ("python", "torch", "triton", "nvidia-dali", "xformers", "timm", "liger-kernel", "maws_kernels"):
        assert f"\n  {label} " in text, label
    assert torch.__version__ in text and "_C " in text and "driver" in text
    for be in maws_kernels.BACKENDS:
        assert f"  kernel    {be} " in text, be
    for be in ATTN_BACKENDS:
        assert f"  attention {be} " in text, be
    assert INTERPRETER_NOTE in text
    for op in OPS:
        for be in ("triton", "torch"):
            assert any(line.split()[:3] == ["ok", op, be] for line in text.splitlines()), (op, be)
    assert text.splitlines()[-1].startswith("verdict: OK: ")

    report = json.loads(out.read_text())
    assert report["ok"] is True and report["verdict"] in text
    assert report["versions"]["torch"]["version"] == torch.__version__
    assert report["versions"]["maws_kernels"]["version"] == maws_kernels.__version__
    assert report["device"]["device"] == "cpu"
    assert report["backends"]["kernels"]["torch"] is None and "CUDA" in report["backends"]["kernels"]["cuda"]
    assert set(report["backends"]["attention"]) == set(ATTN_BACKENDS)
    k = report["kernels"]
    assert k["status"] == "done" and k["interpreted"] is True and INTERPRETER_NOTE in k["note"]
    assert k["rows"] and all(row["ok"] for row in k["rows"])
    assert {(row["op"], row["backend"]) for row in k["rows"]} == {(op, be) for op in OPS for be in ("triton", "torch")}
    assert [p.name for p in tmp_path.iterdir()] == ["doctor.json"]  # written atomically: no temporary left


def test_a_kernel_that_disagrees_with_its_reference_fails_the_run(tmp_path):
    pytest.importorskip("triton")
    # A reference 1% off stands in for a kernel that is 1% off: every layer_norm check must fail, nothing else.
    code = ("import maws_kernels as mk\n"
            "_ref = mk.layer_norm_ref\n"
            "mk.layer_norm_ref = lambda *a, **kw: _ref(*a, **kw) * 1.01\n")
    out = tmp_path / "doctor.json"
    r = _doctor("--device", "cpu", "--sections", "norms", "--json", str(out), code=code, interpret=True)
    assert r.returncode == 1, r.stdout + r.stderr
    lines = r.stdout.splitlines()
    assert any(line.split()[:3] == ["FAIL", "layer_norm", "triton"] for line in lines), r.stdout
    assert any(line.split()[:3] == ["ok", "add_layer_norm", "triton"] for line in lines), r.stdout
    assert lines[-1].startswith("verdict: FAIL: ") and "kernel checks FAILED" in lines[-1]
    report = json.loads(out.read_text())
    failed = {row["op"] for row in report["kernels"]["rows"] if not row["ok"]}
    assert report["ok"] is False and failed == {"layer_norm"}


def test_skip_kernels_reports_the_environment_only(tmp_path):
    out = tmp_path / "doctor.json"
    r = _doctor("--skip-kernels", "--json", str(out))
    assert r.returncode == 0, r.stdout + r.stderr
    assert "kernels: skipped (--skip-kernels)" in r.stdout and "verdict: OK: the environment only" in r.stdout
    report = json.loads(out.read_text())
    assert report["kernels"] is None and report["ok"] is True and "torch" in report["versions"]


@pytest.mark.parametrize("args, says", [
    pytest.param(["--device", "cuda"], "--device cuda: no CUDA device here",
                 marks=pytest.mark.skipif(torch.cuda.is_available(), reason="CUDA is present here")),
    (["--device", "tpu"], "--device 'tpu'"),
    (["--sections", "norms,nope"], "--sections: unknown nope"),
    (["--json", "/nonexistent-dir/doctor.json"], "its directory does not exist"),
])
def test_a_user_mistake_is_one_line_and_exit_2(args, says):
    r = _doctor(*args, "--skip-kernels")
    assert r.returncode == 2, r.stdout + r.stderr
    assert r.stdout == ""
    assert r.stderr.count("\n") == 1 and r.stderr.startswith("maws-doctor: error: ") and says in r.stderr, r.stderr
