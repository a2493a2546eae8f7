"""The training loop shared by every training stage (MAE, WSP).

One stage = one objective (model + loss), one loader, one parallel engine. The loop reads top to
bottom: resume or initialise, apply parallelism, then per step: lr -> forward -> backward ->
reduce, clip, AdamW (the engine's step), with metrics at log steps and a sharded, atomic
checkpoint every ``run.ckpt_every`` steps. Every rank of a torchrun job runs the same loop.

Exact resume: data order and augmentation are functions of (seed, epoch, batch) and masking of
(seed, step), so a resumed run sees the same batches and masks as an uninterrupted one and ends
with the same weights. Nothing random is drawn from a global RNG here.
"""
from __future__ import annotations

import json
import math
import shutil
import time
from contextlib import nullcontext as _nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
import torch.nn as nn
from tqdm import tqdm

from maws_fast.config import OptimConfig, ParallelConfig, RunConfig
from maws_fast.errors import CheckpointError, UserError
from maws_fast.parallel.checkpoint import is_sharded, load_sharded, load_single_process, save_sharded
from maws_fast.parallel.engine import consolidated_state_dict, parallelize
from maws_fast.parallel.mesh import Mesh, all_reduce_mean, single_process
from maws_fast.train.checkpoint import config_diff, list_checkpoints, read_meta, save_checkpoint
from maws_fast.train.metrics import MetricsWriter, Throughput, drop_rows_after
from maws_fast.train.optim import param_groups
from maws_fast.train.schedule import lr_at


def say(msg: str) -> None:
    """Status lines go out at once, also when stdout is a pipe or a CI log."""
    print(msg, flush=True)


@dataclass
class Stage:
    """Everything one training stage needs.

    Attributes:
        name: stage name; also its directory under the run's out_dir.
        objective: module whose ``forward(imgs, targets, step, micro, accum)`` is the loss and whose
            ``model`` attribute is the network (on its device, the same weights on every rank).
        loader: a BatchLoader-like object (``num_batches``, ``epoch(epoch, start_batch)``) yielding this
            data-parallel rank's share of each global batch.
        optim: optimizer / schedule settings.
        flops_per_image: analytic training FLOPs per image (for the logged TFLOP/s).
        fingerprint: the config that determines this stage's result; a checkpoint made with a
            different fingerprint is never silently resumed.
        init_fn: called once when the stage starts from scratch (e.g. load MAE weights), before
            parallelism is applied; returns a line for the log, or None.
    """

    name: str
    objective: nn.Module
    loader: object
    optim: OptimConfig
    flops_per_image: float
    fingerprint: dict
    init_fn: Callable[[], str | None] | None = None

    @property
    def model(self) -> nn.Module:
        return self.objective.model


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


def _micro_batches(imgs: torch.Tensor, targets, accum: int):
    """Split this rank's batch into ``accum`` equal micro-batches (gradient accumulation)."""
    if accum == 1:
        return [(imgs, targets)]
    if imgs.shape[0] % accum:
        raise UserError(f"a per-rank batch of {imgs.shape[0]} does not split into parallel.grad_accum={accum} "
                        "micro-batches; choose a batch size divisible by world / tp * grad_accum")
    xs = imgs.chunk(accum)
    if targets is None:
        ts = [None] * accum
    elif isinstance(targets, (tuple, list)):
        ts = list(zip(*(t.chunk(accum) for t in targets)))
    else:
        ts = list(targets.chunk(accum))
    return list(zip(xs, ts))


def run_stage(stage: Stage, out_dir: str | Path, run: RunConfig, device: torch.device,
              stop_at_step: int | None = None, echo: Callable[[str], None] = say,
              parallel: ParallelConfig | None = None, mesh: Mesh | None = None) -> Path | None:
    """Train ``stage`` to completion (resuming if a checkpoint exists) and return its final checkpoint.

    Every rank of the job calls this with the same arguments; rank 0 logs and writes the final
    weights, every rank writes its shard of each resumable checkpoint.

    Args:
        stage: what to train.
        out_dir: the run's output directory; the stage writes under ``out_dir/<stage.name>``.
        run: run settings (checkpoint / log intervals, progress bar, seed).
        device: training device.
        stop_at_step: checkpoint and return None after this step (simulates an interruption).
        echo: where one-line status messages go (rank 0 only).
        parallel: engine, ZeRO stage, TP degree, gradient accumulation (default: ours, one process).
        mesh: the process mesh (default: one process).

    Returns:
        Path of ``out_dir/<name>/final`` (consolidated weights + meta), or None if stopped early.
    """
    parallel = parallel or ParallelConfig()
    mesh = mesh or single_process()
    main = mesh.rank == 0
    if not main:
        echo = lambda _msg: None  # noqa: E731  (one log, from rank 0)
    stage_dir = Path(out_dir) / stage.name
    final_dir, ckpt_dir = stage_dir / "final", stage_dir / "ckpt"
    if final_dir.exists():
        meta = read_meta(final_dir)  # metadata only: a finished stage's weights are not needed here
        check_fingerprint(meta.get("fingerprint", {}), stage.fingerprint, final_dir)
        echo(f"[{stage.name}] already finished at step {meta['step']} ({final_dir}); skipping")
        return final_dir

    optim_cfg = stage.optim
    spe = stage.loader.num_batches
    total = stage_total_steps(optim_cfg, spe)
    accum = parallel.grad_accum
    ckpts = list_checkpoints(ckpt_dir)  # sharded, or the single-process format of earlier versions
    if not ckpts and stage.init_fn is not None:
        msg = stage.init_fn()  # on the full model, before it is split and sharded
        if msg:
            echo(f"[{stage.name}] {msg}")
    trainable = {n for n, p in stage.model.named_parameters() if p.requires_grad}
    # torch AdamW's state index order (decay group, then no-decay): how earlier checkpoints name it
    groups = param_groups(stage.model, 0.0)
    names = {id(p): n for n, p in stage.model.named_parameters()}
    optim_order = [names[id(p)] for g in groups for p in g["params"]]
    # Frozen tensors (sin-cos pos-embeds) are not sharded: rank 0 stores them whole in each checkpoint.
    frozen = {k: v.detach().clone() for k, v in stage.model.state_dict().items() if k not in trainable}
    engine = parallelize(stage.objective, mesh, engine=parallel.engine, zero_stage=parallel.zero_stage,
                         weight_decay=optim_cfg.weight_decay, betas=(optim_cfg.beta1, optim_cfg.beta2),
                         bucket_mb=parallel.bucket_mb, prefetch=parallel.prefetch, param_dtype=parallel.param_dtype,
                         device=device, kernel_backend=getattr(stage.model, "kernel_backend", None))
    step = 0
    if ckpts:
        check_fingerprint(read_meta(ckpts[-1]).get("fingerprint", {}), stage.fingerprint, ckpts[-1])
        if is_sharded(ckpts[-1]):
            tensors, _extra, meta, rank_metas = load_sharded(ckpts[-1], engine.load_pieces(), with_optim=True)
            optim_steps = int(meta["optim_steps"])
        else:
            tensors, meta, optim_steps = load_single_process(ckpts[-1], engine.load_pieces(), optim_order)
            rank_metas = [{"data_state": meta.get("data_state")}]  # it was written by one process
        engine.load_shard_tensors(tensors, optim_steps)
        step = int(meta["step"])
        if hasattr(stage.loader, "load_state_dict"):
            if len(rank_metas) != mesh.dims.dp * mesh.dims.tp:
                raise CheckpointError(
                    f"{ckpts[-1]} was saved by {len(rank_metas)} processes; the {type(stage.loader).__name__}'s reader "
                    f"position is per process, so resume it with {len(rank_metas)} processes (model and optimizer "
                    "state reshard to any layout; the in-memory reference loader resumes at any world size)")
            data_state = rank_metas[mesh.rank].get("data_state")
            if data_state is not None:
                stage.loader.load_state_dict(data_state)  # the reader resumes where it stopped
        if main:
            drop_rows_after(stage_dir / "metrics.jsonl", step)  # rows past the checkpoint are re-logged below
        echo(f"[{stage.name}] resuming from {ckpts[-1]} at step {step}/{total}"
             + (f" (saved by {meta['parallel']['world']} processes, resharded)" if meta.get("parallel", {}).get(
                 "world") not in (None, mesh.dims.world) else ""))

    def meta_for(s: int) -> dict:
        return {"stage": stage.name, "step": s, "total_steps": total, "steps_per_epoch": spe,
                "fingerprint": stage.fingerprint, "optim_steps": engine.step_count,
                "parallel": {"engine": engine.name, "world": mesh.dims.world, "tp": mesh.dims.tp,
                             "zero_stage": parallel.zero_stage if engine.name == "ours" else None}}

    def rank_meta() -> dict:
        # reader position + bad-sample record of THIS rank's loader: exact resume
        return {"data_state": stage.loader.state_dict() if hasattr(stage.loader, "state_dict") else None}

    def save(s: int) -> None:
        save_sharded(ckpt_dir, f"step_{s:08d}", rank=mesh.rank, world=mesh.dims.world, pieces=engine.pieces(),
                     tensors=engine.shard_tensors(), extra=frozen if main else {}, meta=meta_for(s),
                     rank_meta=rank_meta(), barrier=mesh.barrier, keep=2)

    stage.objective.train()
    metrics = MetricsWriter(stage_dir / "metrics.jsonl") if main else None
    meter = Throughput(stage.flops_per_image)
    bar = tqdm(total=total, initial=step, desc=stage.name, unit="step", disable=not (run.progress and main),
               dynamic_ncols=True, mininterval=1.0)  # a bar redrawn at most once a second keeps piped logs short
    # bf16 autocast: matmuls in bf16; weights per parallel.param_dtype, AdamW state fp32 (no loss scaling needed).
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

            engine.zero_grad()
            micro = _micro_batches(imgs, targets, accum)
            step_loss = torch.zeros((), device=device)
            for m, (x, t) in enumerate(micro):
                last = m == accum - 1
                with engine.no_sync() if not last else _nullcontext():  # communicate on the last only
                    with autocast:
                        loss = engine.model(x, t, step, m, accum)
                    engine.backward(loss / accum if accum > 1 else loss)
                step_loss += loss.detach()
            engine.step(lr, optim_cfg.clip_grad)

            step += 1
            running += step_loss / accum
            n_running += 1
            meter.add(imgs.shape[0] * mesh.dims.dp)
            bar.update(1)
            at_log = step % run.log_every == 0 or step == total
            at_ckpt = step < total and (step % run.ckpt_every == 0 or step == stop_at_step)
            if at_log or at_ckpt:
                all_reduce_mean(running, mesh)  # the mean over data-parallel ranks; NaN on any rank reaches all
            if at_log:
                mean_loss = (running / n_running).item()  # the CPU waits for the GPU here, at log steps only
                if not math.isfinite(mean_loss):
                    raise _diverged(stage.name, f"loss is {mean_loss} at step {step}", ckpt_dir)
                row = {"stage": stage.name, "step": step, "epoch": round(step / spe, 4), "loss": mean_loss, "lr": lr,
                       **meter.read_and_reset()}
                if hasattr(stage.loader, "bad"):  # corrupt images replaced so far (each was logged by name)
                    row["bad_samples"] = len(stage.loader.bad.found)
                if main:
                    metrics.write(row)
                bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{row['images_per_s']:.0f}")
                if not run.progress:
                    echo(f"[{stage.name}] step {step}/{total} loss {mean_loss:.4f} lr {lr:.2e} {row['images_per_s']:.0f} img/s")
                running.zero_()
                n_running = 0
            if at_ckpt:
                # Never checkpoint NaN weights: keep=2 would delete the good checkpoints behind it.
                if n_running and not torch.isfinite(running).item():  # CPU waits here, at checkpoint steps only
                    raise _diverged(stage.name, f"loss became non-finite by step {step}", ckpt_dir)
                save(step)
            if step == stop_at_step and step < total:
                return None
    finally:
        bar.close()
        if metrics is not None:
            metrics.close()

    elapsed = time.perf_counter() - t_start
    weights = consolidated_state_dict(engine, mesh)  # collective: every rank takes part
    if main:
        save_checkpoint(stage_dir, "final", {**frozen, **weights},
                        {**meta_for(step), "done": True, "train_seconds": round(elapsed, 2)})
        shutil.rmtree(ckpt_dir, ignore_errors=True)  # the final checkpoint supersedes the resumable ones
    mesh.barrier()  # nobody moves on (and reads final) before rank 0 has written it
    engine.close()
    echo(f"[{stage.name}] done: {total} steps in {elapsed:.1f} s -> {final_dir}")
    return final_dir
