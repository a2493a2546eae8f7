"""maws-bench kernels / benchmarks/bench_<op>.py: every op's cases run (Triton interpreted on
CPU, tiny shapes) and write rows with the columns the README tables and the issue ask for."""
import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from maws_fast.bench.kernels import OPS
from maws_fast.cli.bench import bench_main

REPO = Path(__file__).resolve().parents[1]
COLUMNS = {"op", "provider", "shape", "dtype", "mode", "ms", "gbps", "pct_copy_bw", "device", "commit", "date",
           "command", "interpreted"}


@pytest.mark.interpreter
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


def _case(fns, skip=None, n=8):
    from maws_fast.bench.kernels import Case

    x = torch.randn(n, 16, requires_grad=True)
    return Case("layer_norm", f"probe n={n}", "fp32", (x,), fns, bytes_fwd=2 * x.numel() * 4,
                bytes_bwd=3 * x.numel() * 4, skip=skip or {})


def test_a_failing_provider_keeps_the_rows_before_and_after_it(tmp_path):
    """Each row reaches the file (a valid JSON list) as it is measured; a provider that raises is a
    failed row with the error's first line and the next provider runs."""
    from maws_fast.bench.kernels import run_cases
    from maws_fast.bench.results import ResultsFile

    out = tmp_path / "kernels.json"
    seen = []

    def ours(x):
        seen.append(len(json.loads(out.read_text())) if out.exists() else 0)
        return x * 2

    def broken(x):
        raise RuntimeError("cuDNN: no kernel for this dtype\nmore detail")

    results = ResultsFile(out)
    rows = run_cases([_case({"ours": ours, "torch": lambda x: x * 2, "sdpa-cudnn": broken, "later": lambda x: x + 1})],
                     ("ours", "torch"), torch.device("cpu"), results=results)
    assert [(r["provider"], r["mode"], r.get("status")) for r in rows] == [
        ("ours", "fwd", None), ("ours", "bwd", None), ("ours", "both", None),
        ("torch", "fwd", None), ("torch", "bwd", None), ("torch", "both", None),
        ("sdpa-cudnn", "fwd", "failed"),
        ("later", "fwd", None), ("later", "bwd", None), ("later", "both", None)]
    assert rows[6]["error"] == "RuntimeError: cuDNN: no kernel for this dtype"
    assert seen[0] == 0 and max(seen) >= 1  # the ours rows went to the file while later timings ran
    assert json.loads(out.read_text()) == rows  # the speed-ups added after the torch baseline are saved too
    assert all("speedup_vs_torch" in r for r in rows if "status" not in r)
    assert not list(tmp_path.glob(".*.tmp"))  # atomic rewrite: no temporary file left behind


def test_an_unsupported_pair_is_a_skipped_row_and_never_called():
    from maws_fast.bench.kernels import run_cases

    def never(x):
        raise AssertionError("a skipped provider was attempted")

    rows = run_cases([_case({"torch": lambda x: x * 2, "sdpa-cudnn": never},
                            skip={"sdpa-cudnn": "SDPA's cuDNN backend has no fp32 kernel"})],
                     ("torch", "cuda"), torch.device("cpu"))
    skipped = {r["provider"]: r for r in rows if r.get("status") == "skipped"}
    assert skipped["sdpa-cudnn"]["reason"] == "SDPA's cuDNN backend has no fp32 kernel"
    assert "no CUDA C++ twin" in skipped["cuda"]["reason"]  # requested, but nothing to run here
    assert {r["provider"] for r in rows if "status" not in r} == {"torch"}


def test_attention_skips_the_pinned_sdpa_backends_without_fp32_kernels():
    from maws_fast.bench.cases.attention import _providers

    fns, skip = _providers("cuda", torch.float32)  # builds no CUDA tensor: only decides
    assert {"sdpa-flash", "sdpa-cudnn"} <= skip.keys() and "sdpa-efficient" in fns
    assert "fp32" in skip["sdpa-cudnn"] and "sdpa-cudnn" not in fns
    fns, skip = _providers("cuda", torch.bfloat16)
    assert {"sdpa-flash", "sdpa-cudnn", "sdpa-efficient"} <= fns.keys()
    assert set(skip) <= {"xformers"}  # only when xformers (or its op) is missing


def test_peak_memory_is_measured_after_a_warm_up_call(monkeypatch):
    """The window opens after one forward + backward (compile, autotuning) and covers one more."""
    import maws_fast.bench.kernels as kernels

    events = []

    class Window:
        def open(self):
            events.append("open")

        def added(self):
            events.append("read")
            return 5 * 2**20

    def op(x):
        events.append("forward")
        return x * 2

    monkeypatch.setattr(kernels, "peak_memory", lambda device: Window())
    assert kernels._peak_mb(op, _case({"torch": op}), torch.device("cpu")) == 5.0
    assert events == ["forward", "open", "forward", "read"]


def test_the_compile_provider_compiles_every_shape_it_reports():
    """Ten shapes of one torch reference (one code object): each compiles afresh (dynamo's eager
    backend here), where dynamo's recompile limit (8) would have left the last ones eager."""
    from maws_fast.bench.kernels import run_cases

    def ref(x):
        return torch.nn.functional.layer_norm(x, x.shape[-1:]) * 2

    rows = run_cases([_case({"torch": ref}, n=n) for n in range(2, 12)], ("torch", "compile"), torch.device("cpu"),
                     compile_backend="eager")
    compiled = [r for r in rows if r["provider"] == "compile"]
    assert len(compiled) == 30 and all("status" not in r for r in compiled)
    assert all(r["compiled"] and r["compiled_graphs"] >= 1 and r["compile_backend"] == "eager" for r in compiled)


def test_a_results_file_that_is_not_a_list_is_refused_before_measuring(tmp_path, capsys):
    out = tmp_path / "kernels.json"
    out.write_text('{"rows": []}')
    assert bench_main(["kernels", "--ops", "layer_norm", "--models", "tiny", "--providers", "torch",
                       "--out", str(out)]) == 2
    assert "not the list of rows" in capsys.readouterr().err


def test_an_unknown_compile_backend_is_one_clear_error(capsys):
    assert bench_main(["kernels", "--ops", "layer_norm", "--models", "tiny", "--providers", "torch,compile",
                       "--compile-backend", "warp_drive", "--out", ""]) == 2
    assert "--compile-backend 'warp_drive' is not a torch.compile backend" in capsys.readouterr().err
