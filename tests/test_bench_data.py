"""maws-bench data runs every CPU provider on real photographs and writes comparable rows."""
import json

import pytest

from maws_fast.cli.bench import bench_main

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


def test_a_failing_provider_keeps_the_others_and_a_missing_one_is_labelled(tmp_path, monkeypatch):
    """The PIL provider raises: its row says why, the DALI rows before and after it are kept, and
    nvJPEG (no GPU here) is a skipped row, not attempted."""
    import maws_fast.bench.data as data
    from maws_fast.data.pil_loader import PilLoader

    real = data._time_loader

    def time_loader(loader, epochs, device):
        if isinstance(loader, PilLoader):
            raise OSError("decoder crashed\ntraceback lines")
        return real(loader, epochs, device)

    monkeypatch.setattr(data, "_time_loader", time_loader)
    out = tmp_path / "data.json"
    assert bench_main(["data", "--images", "16", "--batch-size", "8", "--threads", "1", "--epochs", "1", "--size", "32",
                       "--device", "cpu", "--providers", "dali,pil,dali_uint8,nvjpeg", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["provider"], r.get("status")) for r in rows] == [
        ("dali", None), ("pil", "failed"), ("dali_uint8", None), ("nvjpeg", "skipped")]
    assert rows[1]["error"] == "OSError: decoder crashed" and rows[3]["reason"] == "needs --device cuda"
    assert rows[0]["images_per_s"] > 0 and rows[0]["vs_pil"] is None  # no PIL baseline to compare with
