"""benchmarks/sanitize_kernels.py (the GPU tier's kernels-vs-references check and sanitizer workload) on a
CPU: one JSON row per check, valid after every row; a section that raises is one FAIL row and the next
section still runs; a wrong kernel fails; --only cuda without maws_kernels._C says so. The real sections
run on the GPU; here one of them runs under the interpreter, the others are stand-ins."""
import importlib.util
import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton")

SCRIPT = Path(__file__).resolve().parents[1] / "benchmarks" / "sanitize_kernels.py"


@pytest.fixture
def sk():
    spec = importlib.util.spec_from_file_location("sanitize_kernels", SCRIPT)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


pytestmark = pytest.mark.interpreter


def test_rows_survive_a_raising_section_and_a_wrong_kernel_fails(sk, tmp_path, monkeypatch, capsys):
    seen = []

    def raising(c, dev, backends):
        raise RuntimeError("an illegal memory access was encountered\nsecond line")

    def checking(c, dev):
        seen.append(json.loads((tmp_path / "rows.json").read_text()))  # the file is valid mid-run
        x = torch.randn(5)
        c.close(x, x.clone(), "identical", 0)
        c.close(x + 1, x, "off by one", 1e-3)

    monkeypatch.setattr(sk, "_patch_and_loss", raising)
    monkeypatch.setattr(sk, "_bias_gelu", checking)
    rc = sk.main(["cpu", "--sections", "patch,bias_gelu", "--json", str(tmp_path / "rows.json")])
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rc == 1
    assert [r["check"] for r in rows] == ["patch", "identical", "off by one"]
    assert rows[0]["ok"] is False and rows[0]["error"] == "RuntimeError: an illegal memory access was encountered"
    assert rows[1]["ok"] is True and rows[2]["ok"] is False
    assert seen == [rows[:1]]
    assert "SOME KERNELS DIFFER" in capsys.readouterr().out


def test_a_real_section_passes_under_the_interpreter(sk, tmp_path):
    rc = sk.main(["cpu", "--sections", "adamw", "--json", str(tmp_path / "rows.json")])
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rc == 0 and rows and all(r["ok"] for r in rows)
    assert any(r["check"] == "fused_adamw_multi_ unaligned views" for r in rows)


def test_only_cuda_without_the_extension_says_so(sk, tmp_path):
    rc = sk.main(["cpu", "--only", "cuda", "--json", str(tmp_path / "rows.json")])
    rows = json.loads((tmp_path / "rows.json").read_text())
    assert rc == 1 and rows == [{"check": "cuda twins", "ok": False, "error": "maws_kernels._C is not built"}]


def test_unknown_section_is_a_usage_error(sk):
    with pytest.raises(SystemExit) as e:
        sk.main(["cpu", "--sections", "attention,nope"])
    assert e.value.code == 2
