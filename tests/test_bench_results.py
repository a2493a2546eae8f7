"""Benchmark rows reach their results file as they are measured (maws_fast.bench.results), and the
train benchmark keeps the rows around a provider that raises."""
import json

import pytest

from maws_fast.bench.results import ResultsFile, error_summary, failed, is_measured, skipped
from maws_fast.cli.bench import bench_main
from maws_fast.errors import ConfigError


def test_each_row_is_in_the_file_as_soon_as_it_is_added(tmp_path):
    path = tmp_path / "sub" / "x.json"
    f = ResultsFile(path)
    assert not path.exists()  # nothing measured, nothing written
    f.add({"a": 1})
    assert json.loads(path.read_text()) == [{"a": 1}]
    row = f.add({"a": 2})
    row["ratio"] = 0.5  # a baseline measured later updates a written row ...
    f.save()  # ... and the file follows
    assert json.loads(path.read_text()) == [{"a": 1}, {"a": 2, "ratio": 0.5}]
    g = ResultsFile(path)  # a second run appends after the first one's rows
    g.add({"a": 3})
    assert [r["a"] for r in json.loads(path.read_text())] == [1, 2, 3]
    assert [p.name for p in path.parent.iterdir()] == ["x.json"]
    assert ResultsFile("").add({"a": 4}) == {"a": 4}  # no file: rows in memory only


@pytest.mark.parametrize("text, needle", [("{\"a\": 1}", "not the list of rows"), ("[{\"a\": ", "not a readable JSON")])
def test_a_file_that_is_not_a_list_of_rows_is_one_clear_error(tmp_path, text, needle):
    path = tmp_path / "x.json"
    path.write_text(text)
    with pytest.raises(ConfigError, match=needle):
        ResultsFile(path, "maws-bench probe")
    assert path.read_text() == text  # left as it was


def test_failed_and_skipped_rows_are_labelled():
    e = ValueError("first line\nsecond line")
    assert error_summary(e) == "ValueError: first line" and error_summary(KeyError()) == "KeyError"
    assert failed({"op": "x"}, e) == {"op": "x", "status": "failed", "error": "ValueError: first line"}
    assert skipped({"op": "x"}, "no fp32 kernel") == {"op": "x", "status": "skipped", "reason": "no fp32 kernel"}
    assert is_measured({"ms": 1.0}) and not is_measured(failed({}, e)) and not is_measured(skipped({}, "-"))


def test_bench_train_keeps_the_rows_around_a_provider_that_raises(tmp_path, monkeypatch):
    import maws_fast.bench.train as bt

    real, calls = bt.time_steps, []

    def time_steps(step, steps, warmup, device):
        calls.append(1)
        if len(calls) == 2:
            raise RuntimeError("out of memory")
        return real(step, steps, warmup, device)

    monkeypatch.setattr(bt, "time_steps", time_steps)
    out = tmp_path / "train.json"
    assert bench_main(["train", "--preset", "tiny", "--batch-size", "2", "--steps", "1", "--warmup", "0",
                       "--attn", "sdpa,manual", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    assert [(r["stage"], r["provider"], r.get("status")) for r in rows] == [
        ("mae", "attn=sdpa", None), ("mae", "attn=manual", "failed"), ("wsp", "attn=sdpa", None),
        ("wsp", "attn=manual", None)]
    assert rows[1]["error"] == "RuntimeError: out of memory"
    assert "speedup_vs_manual" not in rows[0]  # its baseline failed
    assert rows[2]["speedup_vs_manual"] > 0 and rows[3]["speedup_vs_manual"] == 1.0
