"""The training loop shared by every training stage (MAE, WSP).

One stage = one model, one loader, one optimizer, one loss function. The loop reads top to
bottom: resume or initialise, then per step: lr -> forward -> backward -> clip -> step, with
metrics at log steps and an atomic checkpoint every ``run.ckpt_every`` steps.

Exact resume: data order and augmentation are functions of (seed, epoch, batch) and masking of
(seed, step), so a resumed run sees the same batches and masks as an uninterrupted one and ends
with the same weights. Nothing random is drawn from a global RNG here.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from maws_fast.config import OptimConfig, RunConfig
from maws_fast.errors import CheckpointError, UserError
from maws_fast.models.vit import load_pretrained
from maws_fast.train.checkpoint import (
    config_diff, list_checkpoints, load_checkpoint, load_optimizer_tensors, read_meta, save_checkpoint,
)
from maws_fast.train.metrics import MetricsWriter, Throughput, drop_rows_after
from maws_fast.train.optim import build_optimizer
from maws_fast.train.schedule import lr_at, set_lr


def say(msg: str) -> None:
    """Status lines go out at once, also when stdout is a pipe or a CI log."""
    print(msg, flush=True)


LossFn = Callable[[nn.Module, torch.Tensor, "torch.Tensor | None", int], torch.Tensor]


@dataclass
class Stage:
    """Everything one training stage needs.

    Attributes:
        name: stage name; also its directory under the run's out_dir.
        model: the module to train (already on its device).
        loader: a BatchLoader-like object (``num_batches``, ``epoch(epoch, start_batch)``).
        optim: optimizer / schedule settings.
        loss_fn: ``loss_fn(model, imgs, targets, step) -> scalar loss``.
        flops_per_image: analytic training FLOPs per image (for the logged TFLOP/s).
        fingerprint: the config that determines this stage's result; a checkpoint made with a
            different fingerprint is never silently resumed.
        init_fn: called once when the stage starts from scratch (e.g. load MAE weights); returns
            a line for the log, or None.
    """

    name: str
    model: nn.Module
    loader: object
    optim: OptimConfig
    loss_fn: LossFn
    flops_per_image: float
    fingerprint: dict
    init_fn: Callable[[], str | None] | None = None


def _to_device(targets, device: torch.device):
    """Targets: None, a tensor, or a tuple of tensors (sparse tag ids + weights)."""
    if isinstance(targets, (tuple, list)):
        return tuple(t.to(device, non_blocking=True) for t in targets)
    return targets.to(device, non_blocking=True) if targets is not None else None


def stage_total_steps(optim: OptimConfig, steps_per_epoch: int) -> int:
    return max(1, math.ceil(optim.epochs * steps_per_epoch))


def check_fingerprint(saved: dict, fingerprint: dict, where: Path) -> None:
    """Raise CheckpointError naming the changed keys if ``where`` was made under another config."""
    current = json.loads(json.dumps(fingerprint))  # tuples -> lists, as they were saved
    diff = config_diff(saved, current)
    if diff:
        raise CheckpointError(
            f"{where} was made with a different config ({'; '.join(diff[:6])}). Resuming it would mix two runs: "
            f"use a new --run.out_dir, or delete {where.parent if where.name == 'final' else where.parent.parent} to start over"
        )


def _diverged(name: str, what: str, ckpt_dir: Path) -> UserError:
    section = name.split("_")[0]  # wsp_scratch -> wsp
    return UserError(f"[{name}] {what}; lower the learning rate (--{section}.blr) or enable --{section}.clip_grad. "
                     f"The last good checkpoint is kept under {ckpt_dir}")


def run_stage(stage: Stage, out_dir: str | Path, run: RunConfig, device: torch.device,
              stop_at_step: int | None = None, echo: Callable[[str], None] = say) -> Path | None:
    """Train ``stage`` to completion (resuming if a checkpoint exists) and return its final checkpoint.

    Args:
        stage: what to train.
        out_dir: the run's output directory; the stage writes under ``out_dir/<stage.name>``.
        run: run settings (checkpoint / log intervals, progress bar, seed).
        device: training device.
        stop_at_step: checkpoint and return None after this step (simulates an interruption).
        echo: where one-line status messages go.

    Returns:
        Path of ``out_dir/<name>/final`` (weights + meta), or None if stopped early.
    """
    stage_dir = Path(out_dir) / stage.name
    final_dir, ckpt_dir = stage_dir / "final", stage_dir / "ckpt"
    if final_dir.exists():
        meta = read_meta(final_dir)  # metadata only: a finished stage's weights are not needed here
        check_fingerprint(meta.get("fingerprint", {}), stage.fingerprint, final_dir)
        echo(f"[{stage.name}] already finished at step {meta['step']} ({final_dir}); skipping")
        return final_dir

    model, optim_cfg = stage.model, stage.optim
    optimizer = build_optimizer(model, optim_cfg, device)
    spe = stage.loader.num_batches
    total = stage_total_steps(optim_cfg, spe)
    step = 0
    ckpts = list_checkpoints(ckpt_dir)
    if ckpts:
        tensors, meta, optim_tensors = load_checkpoint(ckpts[-1])
        check_fingerprint(meta.get("fingerprint", {}), stage.fingerprint, ckpts[-1])
        load_pretrained(model, tensors, strict=True, source=str(ckpts[-1] / "model.safetensors"))
        if optim_tensors is None:
            raise CheckpointError(f"{ckpts[-1]} has no optimizer state; it cannot be resumed")
        load_optimizer_tensors(optimizer, optim_tensors, meta["optimizer_param_groups"])
        step = int(meta["step"])
        if meta.get("data_state") is not None and hasattr(stage.loader, "load_state_dict"):
            stage.loader.load_state_dict(meta["data_state"])  # the reader resumes where it stopped
        drop_rows_after(stage_dir / "metrics.jsonl", step)  # rows past the checkpoint are re-logged below
        echo(f"[{stage.name}] resuming from {ckpts[-1]} at step {step}/{total}")
    elif stage.init_fn is not None:
        msg = stage.init_fn()
        if msg:
            echo(f"[{stage.name}] {msg}")

    def meta_for(s: int) -> dict:
        meta = {"stage": stage.name, "step": s, "total_steps": total, "steps_per_epoch": spe, "fingerprint": stage.fingerprint}
        if hasattr(stage.loader, "state_dict"):  # reader position + bad-sample record: exact resume
            meta["data_state"] = stage.loader.state_dict()
        return meta

    model.train()
    metrics = MetricsWriter(stage_dir / "metrics.jsonl")
    meter = Throughput(stage.flops_per_image)
    bar = tqdm(total=total, initial=step, desc=stage.name, unit="step", disable=not run.progress, dynamic_ncols=True,
               mininterval=1.0)  # a bar redrawn at most once a second keeps piped logs short
    # bf16 autocast: matmuls in bf16, weights / grads / AdamW state stay fp32 (no loss scaling needed).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.precision == "bf16")
    running = torch.zeros((), device=device)  # loss summed on device: no host sync per step
    n_running = 0
    epoch, batch_idx = divmod(step, spe)
    batches = iter(stage.loader.epoch(epoch, batch_idx))
    t_start = time.perf_counter()
    try:
        while step < total:
            try:
                imgs, targets = next(batches)
            except StopIteration:
                epoch += 1
                batches = iter(stage.loader.epoch(epoch, 0))
                continue
            imgs = imgs.to(device, non_blocking=True)
            targets = _to_device(targets, device)
            lr = lr_at(step / spe, optim_cfg.abs_lr, optim_cfg.min_lr, optim_cfg.warmup_epochs, optim_cfg.epochs)
            set_lr(optimizer, lr)

            with autocast:
                loss = stage.loss_fn(model, imgs, targets, step)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if optim_cfg.clip_grad is not None:
                torch.nn.utils.clip_grad_norm_(model.parameters(), optim_cfg.clip_grad)
            optimizer.step()

            step += 1
            running += loss.detach()
            n_running += 1
            meter.add(imgs.shape[0])
            bar.update(1)
            if step % run.log_every == 0 or step == total:
                mean_loss = (running / n_running).item()  # the CPU waits for the GPU here, at log steps only
                if not math.isfinite(mean_loss):
                    raise _diverged(stage.name, f"loss is {mean_loss} at step {step}", ckpt_dir)
                row = {"stage": stage.name, "step": step, "epoch": round(step / spe, 4), "loss": mean_loss, "lr": lr,
                       **meter.read_and_reset()}
                if hasattr(stage.loader, "bad"):  # corrupt images replaced so far (each was logged by name)
                    row["bad_samples"] = len(stage.loader.bad.found)
                metrics.write(row)
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{row['images_per_s']:.0f}")
                if not run.progress:
                    echo(f"[{stage.name}] step {step}/{total} loss {mean_loss:.4f} lr {lr:.2e} {row['images_per_s']:.0f} img/s")
                running.zero_()
                n_running = 0
            if step < total and (step % run.ckpt_every == 0 or step == stop_at_step):
                # Never checkpoint NaN weights: keep=2 would delete the good checkpoints behind it.
                if n_running and not torch.isfinite(running).item():  # CPU waits here, at checkpoint steps only
                    raise _diverged(stage.name, f"loss became non-finite by step {step}", ckpt_dir)
                save_checkpoint(ckpt_dir, f"step_{step:08d}", model.state_dict(), meta_for(step), optimizer, keep=2)
            if step == stop_at_step and step < total:
                return None
    finally:
        bar.close()
        metrics.close()

    elapsed = time.perf_counter() - t_start
    save_checkpoint(stage_dir, "final", model.state_dict(), {**meta_for(step), "done": True, "train_seconds": round(elapsed, 2)})
    shutil.rmtree(ckpt_dir, ignore_errors=True)  # the final checkpoint supersedes the resumable ones
    echo(f"[{stage.name}] done: {total} steps in {elapsed:.1f} s -> {final_dir}")
    return final_dir
