"""maws_kernels.selfcheck, the kernels' own check of this machine (maws-doctor and
benchmarks/sanitize_kernels.py run it): ``python -m maws_kernels.selfcheck`` runs without the trainer; on a
CPU it runs the Triton kernels under the interpreter in a Python of its own; a backend asked for that cannot
run, and a checking Python that dies, are FAIL rows, never a silent pass."""
import json
import os
import subprocess
import sys

import pytest

from maws_kernels import selfcheck

pytest.importorskip("triton")

_CLI = ("import runpy, sys\n"
        "sys.argv = ['maws_kernels.selfcheck', *sys.argv[1:]]\n"
        "try:\n"
        "    runpy.run_module('maws_kernels.selfcheck', run_name='__main__', alter_sys=True)\n"
        "except SystemExit as e:\n"
        "    code = e.code\n"
        "print('trainer modules:', sorted(m for m in sys.modules if m.split('.')[0] == 'maws_fast'))\n"
        "sys.exit(code)\n")


def _cli(*args, interpret: bool):
    """``python -m maws_kernels.selfcheck ARGS`` in a fresh Python, reporting the trainer modules it imported."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    if interpret:
        env["TRITON_INTERPRET"] = "1"
    return subprocess.run([sys.executable, "-c", _CLI, *args], env=env, capture_output=True, text=True, timeout=300)


def _cli_rows(tmp_path, section: str, interpret: bool):
    """Runs one section through the CLI; (its result, its JSON rows), after the checks every run passes."""
    rows_path = tmp_path / "rows.json"
    r = _cli("cpu", "--sections", section, "--json", str(rows_path), interpret=interpret)
    assert r.returncode == 0, r.stdout + r.stderr
    assert "trainer modules: []" in r.stdout
    return r, json.loads(rows_path.read_text())


def test_the_command_runs_without_the_trainer(tmp_path):
    r, rows = _cli_rows(tmp_path, "adamw", interpret=True)
    assert "all kernels match their references" in r.stdout
    assert {(row["op"], row["backend"]) for row in rows} == {
        (op, be) for op in ("fused_adamw_", "fused_adamw_multi_") for be in ("triton", "torch")}
    assert all(row["ok"] for row in rows)


def test_on_a_cpu_the_triton_kernels_run_interpreted_in_a_python_of_their_own(tmp_path):
    r, rows = _cli_rows(tmp_path, "norms", interpret=False)
    assert "Triton kernels checked under the interpreter on CPU — this checks the code, not the GPU compile" in r.stdout
    assert {row["backend"] for row in rows} == {"triton", "torch"} and all(row["ok"] for row in rows)
    assert sum(line.startswith("ok   layer_norm") for line in r.stdout.splitlines()) == len(
        [row for row in rows if row["op"] == "layer_norm"])  # the child's lines come through


def test_a_backend_asked_for_that_cannot_run_is_a_fail_row():
    rows = selfcheck.run_checks("cpu", backends=["cuda"], sections=["adamw"], echo=None)
    assert rows == [{"check": "cuda backend", "ok": False, "error": "the CUDA twins need a CUDA device, not cpu"}]


def test_a_checking_python_that_dies_is_a_fail_row(tmp_path, monkeypatch):
    fake = tmp_path / "python"
    fake.write_text("#!/bin/sh\necho 'Fatal Python error: Segmentation fault'\nexit 139\n")
    fake.chmod(0o755)
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)  # a CPU device then means a fresh Python
    monkeypatch.setattr(sys, "executable", str(fake))
    lines = []
    result = selfcheck.run_selfcheck("cpu", sections=["adamw"], echo=lines.append)
    assert result.interpreted and not result.ok
    assert result.rows == [{"check": "selfcheck", "ok": False,
                            "error": "the interpreter's Python (TRITON_INTERPRET=1) exited 139 after 0 rows"}]
    assert lines[0] == "Fatal Python error: Segmentation fault"


@pytest.mark.parametrize("kwargs", [dict(size="huge"), dict(sections=["nope"]), dict(backends=["tpu"])])
def test_unknown_names_are_refused_before_anything_runs(kwargs):
    with pytest.raises(ValueError, match="unknown"):
        selfcheck.run_selfcheck("cpu", echo=None, **kwargs)
