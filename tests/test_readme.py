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
