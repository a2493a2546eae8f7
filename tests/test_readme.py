"""The README stays true: its Python example runs, and its benchmark tables match the JSON results."""
import re
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def test_python_example_runs(capsys):
    text = (REPO / "README.md").read_text()
    blocks = re.findall(r"```python\n(.*?)```", text, flags=re.S)
    assert blocks, "README has no python example"
    for code in blocks:
        exec(compile(code, "README.md", "exec"), {})
    out = capsys.readouterr().out
    assert "loaded 150 tensors" in out and "initialised 2 (head)" in out


def test_benchmark_tables_are_generated_from_results():
    res = subprocess.run([sys.executable, str(REPO / "benchmarks" / "render_tables.py"), "--check"],
                         capture_output=True, text=True)
    assert res.returncode == 0, res.stderr


def test_failed_and_skipped_rows_are_listed_not_tabulated(tmp_path):
    """A GPU run's labelled rows (maws_fast/bench/results.py) carry no numbers: the tables leave them out and
    list them with their reason, so one failed case never breaks the README."""
    import importlib.util
    import json

    spec = importlib.util.spec_from_file_location("render_tables", REPO / "benchmarks" / "render_tables.py")
    rt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(rt)
    kernels = json.loads((REPO / "benchmarks" / "results" / "train.json").read_text())[:1]
    kernels += [{"bench": "train", "preset": "vit_b16", "provider": "triton", "status": "failed",
                 "error": "OutOfMemoryError: CUDA out of memory"}]
    (tmp_path / "train.json").write_text(json.dumps(kernels))
    (tmp_path / "attention.json").write_text(json.dumps([{"op": "attention", "provider": "cudnn", "dtype": "fp32",
                                                          "status": "skipped", "reason": "cuDNN SDPA has no fp32"}]))
    text = rt.render(tmp_path)
    assert "**train.json** (1 rows" in text
    assert "* preset vit_b16, provider triton: failed (OutOfMemoryError: CUDA out of memory)" in text
    assert "Not measured in attention.json:" in text and "skipped (cuDNN SDPA has no fp32)" in text
