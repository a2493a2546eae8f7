"""maws-bench kernels / benchmarks/bench_<op>.py: every op's cases run (Triton interpreted on
CPU, tiny shapes) and write rows with the columns the README tables and the issue ask for."""
import json
import subprocess
import sys
from pathlib import Path

import pytest

from maws_fast.bench.kernels import OPS
from maws_fast.cli import bench_main

REPO = Path(__file__).resolve().parents[1]
COLUMNS = {"op", "provider", "shape", "dtype", "mode", "ms", "gbps", "pct_copy_bw", "device", "commit", "date",
           "command", "interpreted"}


@pytest.mark.parametrize("op", OPS)
def test_every_op_benchmark_runs_and_writes_rows(tmp_path, capsys, op):
    out = tmp_path / "kernels.json"
    rc = bench_main(["kernels", "--ops", op, "--models", "tiny", "--batch-size", "2", "--dtypes", "fp32",
                     "--providers", "ours,torch", "--out", str(out)])
    assert rc == 0
    rows = json.loads(out.read_text())
    assert rows and all(COLUMNS <= r.keys() for r in rows)
    # the selected providers, plus op-specific ones (attention's padded-SDPA varlen baseline)
    extra = {"attention": {"sdpa-padded"}, "bias_gelu": {"ours_sum"}}.get(op, set())
    assert {r["provider"] for r in rows} == {"ours", "torch"} | extra
    assert all(r["interpreted"] and r["ms"] > 0 for r in rows)
    modes = {r["mode"] for r in rows}
    assert modes == ({"fwd"} if op == "adamw" else {"fwd", "bwd", "both"})
    assert all("speedup_vs_torch" in r for r in rows)
    assert "appended" in capsys.readouterr().out


def test_bench_script_runs_standalone(tmp_path):
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "bench_norm_pix_loss.py"), "--models", "tiny",
                          "--batch-size", "1", "--out", ""], capture_output=True, text=True, timeout=300,
                         env={**__import__("os").environ, "TRITON_INTERPRET": "1"})
    assert res.returncode == 0, res.stderr
    assert "norm_pix_loss" in res.stdout and "INTERPRETED" in res.stdout


def test_cpu_without_interpreter_says_how_to_run(monkeypatch, capsys):
    monkeypatch.delenv("TRITON_INTERPRET")
    rc = bench_main(["kernels", "--ops", "layer_norm", "--device", "cpu", "--providers", "ours,torch", "--out", ""])
    assert rc == 2
    assert "TRITON_INTERPRET=1" in capsys.readouterr().err


def test_unknown_op_is_one_clear_error(capsys):
    assert bench_main(["kernels", "--ops", "softmax", "--out", ""]) == 2
    assert "unknown op(s) ['softmax']" in capsys.readouterr().err
