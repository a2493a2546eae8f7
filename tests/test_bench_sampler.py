"""maws-bench sampler: the epoch order's scale and shuffle-quality rows, at small sizes."""
import json

from maws_fast.cli.bench import bench_main


def test_sampler_rows(tmp_path, capsys):
    out = tmp_path / "sampler.json"
    assert bench_main(["sampler", "--shards", "2000", "--shard-size", "100", "--window", "16", "--batch-size", "256",
                       "--classes", "20", "--positions", "20000", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())
    scale = [r for r in rows if r["what"] == "scale"]
    quality = {r["window"]: r for r in rows if r["what"] == "quality"}
    assert [r["shards"] for r in scale] == [2, 2000] and all(r["state_bytes"] > 0 and r["start_s"] >= 0 for r in scale)
    assert abs(scale[1]["samples"] - 200_000) < 200_000 * 0.1
    assert set(quality) == {1, 8, 16}
    # a batch spans the windows its 256 positions cross (shards hold 90-110 samples), w shards each
    assert all(q["shards_per_batch_min"] >= min(w, 2) and q["shards_per_batch_mean"] <= w * (256 // (w * 90) + 2)
               for w, q in quality.items())
    assert quality[16]["shards_per_batch_mean"] > quality[1]["shards_per_batch_mean"]
    # class-ordered data: a wider window mixes more classes, never more than an i.i.d. draw
    assert quality[16]["classes_per_batch"] > quality[1]["classes_per_batch"]
    assert quality[16]["classes_per_batch"] <= quality[16]["classes_per_batch_iid"]
    text = capsys.readouterr().out
    assert "goal at" in text and "shards open per node" in text and f"appended 5 rows to {out}" in text
