"""Frozen-feature evaluation of an encoder, as the recipe's linprobe stage runs it.

The feature sets (Fashion-MNIST's in-memory splits, or labelled JPEG folders / shards through
the eval transform), a linear probe and k-shot classifiers on them, and the results table.
Which encoders are evaluated, and whether their checkpoints fit the config, is the recipe's
business (``maws_fast.train.evaluation``).
"""
from __future__ import annotations

import functools
from collections.abc import Callable

import torch
from torch import nn

from maws_fast.config import Config
from maws_fast.data.demo import DemoData
from maws_fast.data.loader import eval_format, jpeg_loader
from maws_fast.data.reference import BatchLoader
from maws_fast.errors import ConfigError, DataError
from maws_fast.eval.features import extract_features
from maws_fast.eval.fewshot import fewshot
from maws_fast.eval.linear_probe import linear_probe
from maws_fast.seeds import Stream, mix_seed

# feats(model, "train" | "test") -> (features (N, D) float32, labels (N,) int64)
Features = Callable[[nn.Module, str], tuple[torch.Tensor, torch.Tensor]]


def eval_subset(cfg: Config, data: DemoData) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed random subset of the train split whose frozen features fit the probes."""
    g = torch.Generator().manual_seed(mix_seed(cfg.run.seed, Stream.EVAL_SUBSET))
    n = len(data.train_y) if cfg.eval.train_subset == 0 else min(cfg.eval.train_subset, len(data.train_y))
    sub = torch.randperm(len(data.train_y), generator=g)[:n]
    return data.train_x[sub], data.train_y[sub]


def check_eval_config(cfg: Config, data: DemoData | None) -> None:
    """Fail before any training if the evaluation cannot run: no labelled data, or too few images for k-shot."""
    if data is None:
        missing = [k for k in ("eval_train", "eval_val") if getattr(cfg.data, k) is None]
        if missing:
            raise ConfigError(f"config: data.{missing[0]}: linprobe on data.dataset=jpeg needs labelled images: set "
                              "--data.eval_train=DIR and --data.eval_val=DIR (image folders, or shards written from "
                              "folders), or run only [mae, wsp]")
        if cfg.data.loader == "reference":
            raise ConfigError("config: data.loader: JPEG evaluation data needs --data.loader=pil or dali")
        return
    _, y = eval_subset(cfg, data)
    least = int(torch.bincount(y, minlength=10).min())
    k = max(int(s) for s in cfg.eval.shots)
    if least < k:
        raise ConfigError(f"config: eval.shots: {k}-shot needs {k} images per class but eval.train_subset="
                          f"{cfg.eval.train_subset} holds only {least} of some class; raise eval.train_subset")


def feature_sets(cfg: Config, data: DemoData | None, device: torch.device,
                 log: Callable[[str], None] = functools.partial(print, flush=True)) -> tuple[Features, int]:
    """``(feats, num_classes)`` of the eval data.

    Fashion-MNIST (the in-memory splits, train_subset of train) or, for dataset=jpeg, the
    labelled data.eval_train / data.eval_val through the loader's eval transform.
    """
    e = cfg.eval
    if data is not None:
        sets = {"train": eval_subset(cfg, data), "test": (data.test_x, data.test_y)}

        def feats(model, split):
            x, y = sets[split]
            loader = BatchLoader(x, None, e.batch_size, cfg.run.seed, cfg.data.mean, cfg.data.std,
                                 drop_last=False, shuffle=False)
            return extract_features(model, loader.epoch(0), device=device), y

        return feats, 10

    from maws_fast.data.sources import open_source

    d = cfg.data
    paths = {"train": d.eval_train, "test": d.eval_val}
    # Listed once: every encoder of the run is evaluated on the same two sources.
    sources = {k: open_source(eval_format(p), p, d.tags, d.vocab) for k, p in paths.items()}

    def feats(model, split):
        loader = jpeg_loader(cfg, sources[split], e.batch_size, None, 0.0, "label", device, eval_transform=True,
                             log=log)
        labels: list[torch.Tensor] = []

        def batches():  # features and labels from one pass
            for x, y in loader.epoch(0):
                if (y < 0).any():
                    raise DataError(f"{paths[split]} has images without a class label; evaluation data must be an "
                                    "image folder or shards written from one (`maws-data shards --folder`)")
                labels.append(y.cpu())
                yield x, y

        try:
            f = extract_features(model, batches(), device=device)
        finally:
            loader.close()  # its reader thread and DALI pipelines (nvJPEG buffers on a GPU)
        return f, torch.cat(labels)

    num_classes = sources["train"].num_classes
    if num_classes == 0:
        raise ConfigError(f"config: data.eval_train: {paths['train']} has no class labels; use an image folder or "
                          "shards written from one (`maws-data shards --folder`)")
    return feats, num_classes


def probe_encoder(cfg: Config, model: nn.Module, feats: Features, num_classes: int) -> dict:
    """Linear probe and k-shot top-1 of one encoder's frozen features (its row of the results table)."""
    e = cfg.eval
    (f_train, train_y), (f_test, test_y) = feats(model, "train"), feats(model, "test")
    probe = linear_probe(f_train, train_y, f_test, test_y, num_classes=num_classes, epochs=e.probe_epochs,
                         batch_size=e.probe_batch_size, lr=e.probe_lr, seed=cfg.run.seed,
                         optimizer=e.probe_optimizer, warmup_epochs=e.probe_warmup_epochs)
    row = {"linear_probe_top1": probe["top1"], "linear_probe_train": probe["num_train"]}
    for k in e.shots:
        fs = fewshot(f_train, train_y, f_test, test_y, num_classes=num_classes, shots=int(k),
                     trials=e.fewshot_trials, seed=cfg.run.seed)
        row[f"{k}shot_top1_mean"], row[f"{k}shot_top1_std"] = fs["top1_mean"], fs["top1_std"]
    return row


def results_table(rows: list[dict], shots: list[int]) -> str:
    """A small fixed-width table of the evaluation rows (with fine-tune columns when any row has them)."""
    ft = any("finetune_top1" in r for r in rows)
    zs = any("zero_shot_top1" in r for r in rows)
    head = ["model", "training steps", "linear probe top-1"] + [f"{k}-shot top-1 (mean ± std)" for k in shots]
    head += ["fine-tune steps", "fine-tuned top-1 / top-5"] if ft else []
    head += ["LiT steps", "zero-shot top-1 / top-5"] if zs else []

    def pct(r, key):
        return f"{100 * r[key]:.2f}%" if key in r else "-"

    def cells(r):
        out = [r["model"], str(r["train_steps"]), pct(r, "linear_probe_top1")]
        out += [f"{100 * r[f'{k}shot_top1_mean']:.2f} ± {100 * r[f'{k}shot_top1_std']:.2f}%"
                if f"{k}shot_top1_mean" in r else "-" for k in shots]
        if ft:
            out += [str(r.get("finetune_steps", "-")),
                    f"{pct(r, 'finetune_top1')} / {pct(r, 'finetune_top5')}" if "finetune_top1" in r else "-"]
        if zs:
            out += [str(r.get("lit_steps", "-")),
                    f"{pct(r, 'zero_shot_top1')} / {pct(r, 'zero_shot_top5')}" if "zero_shot_top1" in r else "-"]
        return out

    body = [cells(r) for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(b) for b in body])
