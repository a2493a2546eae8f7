"""``maws-bench plot``: PNGs from a run's metrics.jsonl and the benchmark results, and its errors."""
import argparse
import json

import pytest

from maws_fast.bench.plot import add_plot_args, bench_plot, stage_metrics
from maws_fast.errors import ConfigError, UserError

pytest.importorskip("matplotlib", reason="the [plot] extra (installed by scripts/setup.sh --dev)")


def _args(*argv):
    p = argparse.ArgumentParser()
    add_plot_args(p)
    return p.parse_args(list(argv))


def _run(tmp_path):
    for stage, n in (("mae", 5), ("wsp", 3)):
        d = tmp_path / "run" / stage
        d.mkdir(parents=True)
        rows = [{"stage": stage, "step": 2 * i + 2, "loss": 1.0 / (i + 1), "images_per_s": 100.0 + i,
                 "grad_norm": None if stage == "mae" else 0.5 * i + 1} for i in range(n)]
        (d / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    return tmp_path / "run"


def _png_size(path):
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")


def test_plots_a_run_and_the_committed_results(tmp_path):
    run = _run(tmp_path)
    stages = stage_metrics(run)
    assert list(stages) == ["mae", "wsp"] and [r["step"] for r in stages["mae"]] == [2, 4, 6, 8, 10]
    written = bench_plot(_args("--run", str(run), "--results", "benchmarks/results", "--out", str(tmp_path / "png")))
    assert sorted(p.name for p in written) == ["fit.png", "step.png", "training.png"]
    w, h = _png_size(tmp_path / "png" / "training.png")
    assert w > 1000 and h > 300  # three panels: loss, images/s, grad norm (wsp logs one)


def test_missing_inputs_are_clear_errors(tmp_path):
    with pytest.raises(ConfigError, match="has no <stage>/metrics.jsonl"):
        bench_plot(_args("--run", str(tmp_path), "--results", "", "--out", str(tmp_path / "png")))
    with pytest.raises(ConfigError, match="nothing to draw"):
        bench_plot(_args("--run", "", "--results", "", "--out", str(tmp_path / "png")))
    with pytest.raises(ConfigError, match="no rows of engine 'nope'"):
        bench_plot(_args("--results", "benchmarks/results", "--fit-engine", "nope", "--out", str(tmp_path / "png")))


def test_without_matplotlib_one_clear_error(tmp_path, monkeypatch):
    import builtins

    real = builtins.__import__

    def no_mpl(name, *a, **k):
        if name.startswith("matplotlib"):
            raise ImportError("No module named 'matplotlib'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_mpl)
    with pytest.raises(UserError, match="needs matplotlib.*pip install matplotlib"):
        bench_plot(_args("--run", str(_run(tmp_path)), "--out", str(tmp_path / "png")))
