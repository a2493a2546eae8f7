"""maws-bench data runs every CPU provider on real photographs and writes comparable rows."""
import json

import pytest

from maws_fast.cli import bench_main

pytest.importorskip("nvidia.dali")
pytest.importorskip("sklearn")


@pytest.mark.parametrize("transform", ["mae", "finetune"])
def test_bench_data_rows(tmp_path, capsys, transform):
    out = tmp_path / "data.json"
    assert bench_main(["data", "--images", "24", "--batch-size", "8", "--threads", "1", "--epochs", "1",
                       "--size", "32", "--device", "cpu", "--transform", transform, "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [r["provider"] for r in rows] == ["dali", "dali_uint8", "pil"]
    for r in rows:
        assert r["images"] == 16 and r["images_per_s"] > 0 and r["commit"] and r["device"].startswith("cpu")
        assert r["transform"] == transform
    assert rows[2]["vs_pil"] == 1.0
    assert "vs PIL" in capsys.readouterr().out


def test_bench_data_rejects_unknown_provider(capsys):
    assert bench_main(["data", "--providers", "dali,magic", "--out", ""]) == 2
    assert "magic" in capsys.readouterr().err
