"""``maws-bench plot``: PNG charts of a run's metrics.jsonl and of the benchmark results.

* ``training.png``: loss and images/s against the step, one line per stage found under ``--run``
  (every ``<stage>/metrics.jsonl``), plus the gradient norm where the rows carry one;
* ``step.png``: from ``benchmarks/results/step.json``, the newest run's counted memory-bound and
  saved-activation MB per image of each variant and checkpointing mode;
* ``fit.png``: from ``fit.json``, the computed largest per-GPU batch on an 80 GB GPU per preset
  and mode (the newest run, one engine).

matplotlib is an optional dependency (the ``[plot]`` extra); without it the command is one clear
error. Nothing is drawn for an input that is missing; the command says which.
"""
from __future__ import annotations

import argparse
import json
from pathlib import Path

from maws_fast.bench.common import REPO_RESULTS, default_out
from maws_fast.errors import ConfigError, UserError
from maws_fast.train.metrics import read_metrics


def add_plot_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--run", default="", help="a run's out_dir (its <stage>/metrics.jsonl files); '' = none")
    p.add_argument("--results", default=REPO_RESULTS, help="folder of the benchmark JSON files; '' = none")
    p.add_argument("--fit-engine", default="ours:3", help="the engine whose rows fit.png shows")
    p.add_argument("--out", default=default_out("plots"), help="folder the PNGs are written to (the README's: docs/plots)")


def _pyplot():
    try:
        import matplotlib
    except ImportError as e:
        raise UserError("maws-bench plot needs matplotlib, which is not installed: `pip install matplotlib` "
                        "(or install maws_fast with the [plot] extra)") from e
    matplotlib.use("Agg")  # files only: no display needed
    import matplotlib.pyplot as plt

    return plt


def stage_metrics(run_dir: Path) -> dict[str, list[dict]]:
    """{stage: its metrics rows, in step order} for every stage folder of a run."""
    out = {}
    for path in sorted(run_dir.glob("*/metrics.jsonl")):
        rows = sorted(read_metrics(path), key=lambda r: r.get("step", 0))
        if rows:
            out[path.parent.name] = rows
    return out


def plot_training(plt, stages: dict[str, list[dict]], path: Path) -> Path:
    with_norm = any(r.get("grad_norm") is not None for rows in stages.values() for r in rows)
    fig, axes = plt.subplots(1, 3 if with_norm else 2, figsize=(15 if with_norm else 10, 3.8))
    for stage, rows in stages.items():
        steps = [r["step"] for r in rows]
        axes[0].plot(steps, [r["loss"] for r in rows], label=stage)
        axes[1].plot(steps, [r["images_per_s"] for r in rows], label=stage)
        if with_norm:
            norms = [(r["step"], r["grad_norm"]) for r in rows if r.get("grad_norm") is not None]
            if norms:
                axes[2].plot(*zip(*norms), label=stage)
    titles = ("loss", "images / s", "gradient norm (before clipping)")
    for ax, title in zip(axes, titles):
        ax.set_title(title)
        ax.set_xlabel("step")
        ax.grid(alpha=0.3)
        ax.legend(fontsize=8)
    axes[0].set_yscale("log")
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _newest(rows: list[dict]) -> list[dict]:
    last = (rows[-1].get("commit"), rows[-1].get("date"))
    return [r for r in rows if (r.get("commit"), r.get("date")) == last]


def plot_step(plt, rows: list[dict], path: Path) -> Path:
    rows = [r for r in _newest(rows) if "mem_mb_per_img" in r]
    labels = [f"{r['stage']} {r['preset']}\n{r['variant']}\nckpt {r.get('activation_checkpoint', 'none')}" for r in rows]
    fig, axes = plt.subplots(1, 2, figsize=(max(8.0, 1.3 * len(rows)), 4.5))
    for ax, key, title in ((axes[0], "mem_mb_per_img", "memory-bound MB / image (counted)"),
                           (axes[1], "saved_mb_per_img", "saved activations MB / image (counted)")):
        ax.bar(range(len(rows)), [r[key] for r in rows], color="tab:blue")
        ax.set_xticks(range(len(rows)), labels, fontsize=6, rotation=90)
        ax.set_title(title)
        ax.grid(axis="y", alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def plot_fit(plt, rows: list[dict], engine: str, path: Path) -> Path:
    newest = _newest(rows)
    rows = [r for r in newest if r["engine"] == engine]
    if not rows:
        raise ConfigError(f"maws-bench plot: fit.json has no rows of engine {engine!r} in its newest run; "
                          f"choose --fit-engine from {sorted({r['engine'] for r in newest})}")
    # a fine-tune has a row group per resolution; older files' rows have no resolution (their preset's own)
    cases = list(dict.fromkeys((r["stage"], r["preset"], r.get("resolution")) for r in rows))
    modes = list(dict.fromkeys(r["activation_checkpoint"] for r in rows))
    fig, ax = plt.subplots(figsize=(max(8.0, 0.9 * len(cases) * len(modes) / 2), 4.2))
    width = 0.8 / len(modes)
    for i, mode in enumerate(modes):
        by_case = {(r["stage"], r["preset"], r.get("resolution")): r["max_batch_h100_80gb"] for r in rows
                   if r["activation_checkpoint"] == mode}
        ax.bar([c + i * width for c in range(len(cases))], [max(by_case.get(c, 0), 1) for c in cases], width,
               label=f"checkpoint {mode}")
    ax.set_xticks([c + 0.4 - width / 2 for c in range(len(cases))],
                  [f"{s}\n{p}" + (f"\n{res}" if s == "finetune" else "") for s, p, res in cases], fontsize=7)
    ax.set_yscale("log")
    ax.set_title(f"largest per-GPU batch on 80 GB, {engine} (COMPUTED)")
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def bench_plot(args: argparse.Namespace) -> list[Path]:
    if not args.run and not args.results:
        raise ConfigError("maws-bench plot: nothing to draw; give --run (a run's out_dir) and / or --results")
    plt = _pyplot()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    if args.run:
        stages = stage_metrics(Path(args.run))
        if not stages:
            raise ConfigError(f"maws-bench plot: --run {args.run} has no <stage>/metrics.jsonl; point it at a "
                              "run's out_dir (run.out_dir)")
        written.append(plot_training(plt, stages, out / "training.png"))
    if args.results:
        res = Path(args.results)
        for name, draw in (("step", lambda rows, p: plot_step(plt, rows, p)),
                           ("fit", lambda rows, p: plot_fit(plt, rows, args.fit_engine, p))):
            f = res / f"{name}.json"
            rows = json.loads(f.read_text()) if f.exists() else []
            if not rows:
                print(f"maws-bench plot: no rows in {f}; {name}.png not drawn")
                continue
            written.append(draw(rows, out / f"{name}.png"))
    for p in written:
        print(f"wrote {p}")
    return written
