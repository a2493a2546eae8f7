"""The recipe's evaluation (the ``linprobe`` stage kind): frozen-feature probes of every encoder the
run trained (or of the one checkpoint ``eval.init`` / ``eval.clip`` names), with the columns the
other stage kinds report beside them (fine-tuned top-1 / top-5, zero-shot top-1 / top-5), written
as ``results.json`` and ``results.md``. Rank 0 runs it alone: frozen-feature probes are small.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Callable

import torch

from maws_fast.config import Config
from maws_fast.data.demo import DemoData
from maws_fast.errors import CheckpointError, ConfigError, UserError
from maws_fast.eval.evaluate import check_eval_config, feature_sets, probe_encoder, results_table
from maws_fast.models import build_classifier, load_encoder, load_pretrained, unwrap_state_dict
from maws_fast.storage import atomic_write_text, load_checkpoint, read_meta, read_weights
from maws_fast.train.checkpoint import check_fingerprint
from maws_fast.train.lit import load_lit, same_weights, zero_shot, zero_shot_prompts
from maws_fast.train.loop import say
from maws_fast.train.runs import ENCODER_LABELS, check_init, finetune_runs, fingerprints, lit_runs, wsp_runs

Echo = Callable[[str], None]
# A stage kind's columns in the results table: (cfg, data, rows, encoders by stage, features, device, echo)
Report = Callable[[Config, "DemoData | None", list, dict, Callable, torch.device, Echo], None]


def check_linprobe_config(cfg: Config, data: DemoData | None) -> None:
    """Before any training: the probes' config, and the checkpoints ``eval.init`` / ``eval.clip`` name."""
    check_eval_config(cfg, data)
    if cfg.eval.init is not None:
        check_init("eval.init", cfg.eval.init, ())
    if cfg.eval.clip is not None:
        check_init("eval.clip", cfg.eval.clip, ())


def _probe_checkpoint(cfg: Config, feats, num_classes: int, device: torch.device, echo: Echo) -> dict:
    """``eval.init``: the probes of any checkpoint (ours, the official MAE's, MAWS's, timm's) on
    ``cfg.model``'s architecture; a checkpoint with ``fc_norm`` and no ``norm`` is pooled as it was
    trained (patch-token mean + fc_norm), any other by its cls token after ``norm``."""
    path = Path(cfg.eval.init)
    sd = unwrap_state_dict(read_weights(path))
    pool = "avg" if "fc_norm.weight" in sd and "norm.weight" not in sd else "token"
    # learnable: a trained table (MAWS, timm, fine-tunes) is kept, resampled if the grid differs
    model = build_classifier(cfg.model, num_classes=0, global_pool=pool, pos_embed_learnable=True).to(device)
    report = load_encoder(model, {k: v for k, v in sd.items() if not k.startswith("head.")}, str(path),
                          hint="set --model.preset (and img_size / patch_size) to the checkpoint's architecture")
    echo(f"[linprobe] {path}: {report.summary()} ({pool} pooling)")
    return {"model": str(path), "stage": "eval.init", "train_steps": "-",
            **probe_encoder(cfg, model, feats, num_classes)}


def _evaluate_clip(cfg: Config, data: DemoData | None, feats, num_classes: int, device: torch.device,
                   echo: Echo) -> dict:
    """``eval.clip``: a released MAWS CLIP checkpoint's zero-shot accuracy and its image tower's probes."""
    from maws_fast.models.maws_clip import load_maws_clip, load_xlmr_tokenizer, xlmr_ids

    path = Path(cfg.eval.clip)
    model = load_maws_clip(path, device)
    v, m = model.vision_encoder, cfg.model
    got = (v.patch_embed.img_size[0], v.patch_size, v.in_chans, v.embed_dim)
    want = (m.img_size, m.patch_size, m.in_chans, m.embed_dim)
    if got != want:
        raise ConfigError(f"config: model: {path} is a ViT of img_size / patch_size / in_chans / embed_dim {got}, but the "
                          f"config says {want}; set --model.preset (e.g. vit_b16) and --data.mean / --data.std to the "
                          "checkpoint's (MAWS: 224 px, ImageNet mean and std)")
    tok = load_xlmr_tokenizer(cfg.eval.clip_tokenizer)
    classnames, templates = zero_shot_prompts(cfg, data)
    f_test, y_test = feats(v, "test")
    acc = zero_shot(model, lambda xs: xlmr_ids(tok, xs), f_test, y_test, classnames, templates, device)
    row = {"model": f"{path.name} (MAWS CLIP)", "stage": "eval.clip", "train_steps": "-",
           **probe_encoder(cfg, v, feats, num_classes), **acc}
    echo(f"[linprobe] {row['model']}: zero-shot top-1 {100 * acc['zero_shot_top1']:.2f}%, top-5 "
         f"{100 * acc['zero_shot_top5']:.2f}% on "
         f"{len(y_test)} images ({len(templates)} prompts per class), linear probe {100 * row['linear_probe_top1']:.2f}%")
    return row


def evaluate(cfg: Config, data: DemoData | None, device: torch.device, echo: Echo,
             reports: tuple[Report, ...] = ()) -> list[dict]:
    """Linear probe and k-shot on frozen cls features of every finished encoder of this run (or of
    the one checkpoint ``eval.init`` names), then each of ``reports`` adds its columns."""
    out = Path(cfg.run.out_dir)
    candidates = [(name, label) for name, _, label in wsp_runs(cfg)] + [("mae", ENCODER_LABELS["mae"])]
    prints = fingerprints(cfg)
    feats, num_classes = feature_sets(cfg, data, device, log=say)
    memo: dict = {}

    def feats_once(model, split):  # an encoder's features serve its probes and its LiT run's zero-shot
        if (id(model), split) not in memo:
            memo[id(model), split] = (model, feats(model, split))
        return memo[id(model), split][1]

    if cfg.eval.clip is not None:
        return [_evaluate_clip(cfg, data, feats, num_classes, device, echo)]
    if cfg.eval.init is not None:
        row = _probe_checkpoint(cfg, feats, num_classes, device, echo)
        echo(f"[linprobe] {row['model']}: linear probe {100 * row['linear_probe_top1']:.2f}%"
             + "".join(f", {k}-shot {100 * row[f'{k}shot_top1_mean']:.2f}%" for k in cfg.eval.shots))
        return [row]
    rows, encoders = [], {}
    for name, label in candidates:
        final = out / name / "final"
        if not final.exists():
            continue
        tensors, meta = load_checkpoint(final)
        check_fingerprint(meta.get("fingerprint", {}), prints[name], final)
        model = build_classifier(cfg.model, num_classes=0).to(device)
        report = load_pretrained(model, tensors, source=str(final))
        if report.initialised:
            raise CheckpointError(f"{final} lacks encoder tensors {report.initialised[:4]}; it cannot be evaluated")
        steps = f"{name.split('_')[0]} {meta['step']}"
        if name == "wsp" and cfg.wsp.init == "mae":
            steps = f"mae {read_meta(out / 'mae' / 'final')['step']} + {steps}"
        encoders[name] = model
        row = {"model": label, "stage": name, "train_steps": steps, **probe_encoder(cfg, model, feats_once, num_classes)}
        echo(f"[linprobe] {label}: linear probe {100 * row['linear_probe_top1']:.2f}%"
             + "".join(f", {k}-shot {100 * row[f'{k}shot_top1_mean']:.2f}%" for k in cfg.eval.shots))
        rows.append(row)
    if not rows:
        raise UserError(f"nothing to evaluate under {out}: run the mae and wsp stages first")
    for report in reports:
        report(cfg, data, rows, encoders, feats_once, device, echo)
    return rows


def report_zero_shot(cfg: Config, data: DemoData | None, rows: list[dict], encoders: dict, feats,
                     device: torch.device, echo: Echo) -> None:
    """Each finished LiT run's zero-shot top-1 / top-5 on the test split, next to the probe numbers of
    the encoder it locked (its test features reused when the tower's weights are that encoder's)."""
    by_stage = {r["stage"]: r for r in rows}
    classnames, templates = zero_shot_prompts(cfg, data)
    for name, init, label in lit_runs(cfg):
        if not (Path(cfg.run.out_dir) / name / "final").exists():
            continue
        model, tok, meta = load_lit(cfg, name, device)
        enc = encoders.get(init)
        tower = enc if enc is not None and same_weights(model.vision_encoder, enc) else model.vision_encoder
        f_test, y_test = feats(tower, "test")
        res = zero_shot(model, tok.encode, f_test, y_test, classnames, templates, device)
        echo(f"[linprobe] {label}: zero-shot top-1 {100 * res['zero_shot_top1']:.2f}%, top-5 "
             f"{100 * res['zero_shot_top5']:.2f}% on {len(y_test)} test images ({len(templates)} prompts per class)")
        row = by_stage.get(init)
        if row is None:
            row = {"model": label, "stage": name, "train_steps": "-"}
            rows.append(row)
        row.update(res, lit_steps=meta["step"])


def report_finetunes(cfg: Config, data: DemoData | None, rows: list[dict], encoders: dict, feats,
                     device: torch.device, echo: Echo) -> None:
    """Each finished fine-tune's top-1 / top-5 next to the probe numbers of the encoder it started
    from; a fine-tune of an outside checkpoint gets a row of its own."""
    by_stage = {r["stage"]: r for r in rows}
    for name, init, label in finetune_runs(cfg):
        f = Path(cfg.run.out_dir) / name / "eval.json"
        if not f.exists():
            continue
        res = json.loads(f.read_text())
        row = by_stage.get(init)
        if row is None:
            row = {"model": label, "stage": name, "train_steps": "-"}
            rows.append(row)
        row.update(finetune_top1=res["top1"], finetune_top5=res["top5"], finetune_steps=res["step"])


def evaluate_run(cfg: Config, data: DemoData | None, device: torch.device, out: Path, echo: Echo,
                 reports: tuple[Report, ...]) -> list[dict]:
    """:func:`evaluate`, then ``results.json`` and ``results.md`` under ``out`` and the table echoed."""
    rows = evaluate(cfg, data, device, echo, reports)
    atomic_write_text(out / "results.json", json.dumps(rows, indent=2))
    table = results_table(rows, cfg.eval.shots)
    atomic_write_text(out / "results.md", table + "\n")
    echo("\n" + table)
    return rows
