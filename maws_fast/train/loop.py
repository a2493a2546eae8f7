"""The training loop shared by every training stage (MAE, WSP, fine-tune, LiT).

One stage = one objective (model + loss), one loader, one parallel engine. ``run_stage`` reads
top to bottom: skip a finished stage; open the stage's compile scope (dynamo's caches reset for
this model, its recompile limit and errors held until training ends: :mod:`maws_fast.train.regional_compile`);
initialise or resume (:func:`start`: ``init_fn``, then :func:`~maws_fast.train.parallelize.parallelize`
applies TP -> activation checkpointing -> compile -> the engine, then the checkpoint is loaded);
then per step lr -> :func:`train_step` (micro-batches, backward, the engine's reduce + clip + AdamW)
-> the step log (metrics, divergence checks) -> a sharded checkpoint every ``run.ckpt_every``
steps; finally the consolidated ``final/`` checkpoint. Every rank of a torchrun job runs the same loop.

Exact resume: data order and augmentation are functions of (seed, epoch, batch) and masking of
(seed, step), so a resumed run sees the same batches and masks as an uninterrupted one and ends
with the same weights. Nothing random is drawn from a global RNG here.
"""
from __future__ import annotations

import math
import time
from collections.abc import Iterator
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

import torch
import torch.nn as nn

from maws_fast.config import OptimConfig, ParallelConfig, RunConfig, resolve_parallel, resolve_run
from maws_fast.data.loader import Loader
from maws_fast.errors import UserError
from maws_fast.parallel.engine import AdamWSpec, Engine
from maws_fast.parallel.mesh import Mesh, single_process
from maws_fast.parallel.watchdog import progress
from maws_fast.storage import list_checkpoints, read_meta
from maws_fast.train.checkpoint import Checkpointer, check_fingerprint, frozen_tensors
from maws_fast.train.metrics import StepLog
from maws_fast.train.preempt import Preempted, Preemption, signal_name
from maws_fast.train.optim import param_groups
from maws_fast.train.parallelize import parallelize
from maws_fast.train.regional_compile import CompileScope, compile_scope
from maws_fast.train.schedule import lr_at


def say(msg: str) -> None:
    """Status lines go out at once, also when stdout is a pipe or a CI log."""
    print(msg, flush=True)


def silent(_msg: str) -> None:
    """The echo of ranks other than 0 (one log per job)."""


@dataclass
class Stage:
    """Everything one training stage needs.

    Attributes:
        name: stage name; also its directory under the run's out_dir.
        objective: module whose ``forward(imgs, targets, step, micro, accum)`` is the loss and whose
            ``model`` attribute is the network (on its device, the same weights on every rank).
        loader: a :class:`~maws_fast.data.loader.Loader` yielding this data-parallel rank's share of
            each global batch.
        optim: optimizer / schedule settings.
        flops_per_image: analytic training FLOPs per image (for the logged TFLOP/s).
        fingerprint: the config that determines this stage's result; a checkpoint made with a
            different fingerprint is never silently resumed.
        init_fn: called once when the stage starts from scratch (e.g. load MAE weights), before
            parallelism is applied; returns a line for the log, or None.
        param_groups: the AdamW groups of the model (e.g. layer-wise lr decay); None: MAE's two
            (decay / no decay at ``optim.weight_decay``).
    """

    name: str
    objective: nn.Module
    loader: Loader
    optim: OptimConfig
    flops_per_image: float
    fingerprint: dict
    init_fn: Callable[[], str | None] | None = None
    param_groups: Callable[[nn.Module], list[dict]] | None = None

    @property
    def model(self) -> nn.Module:
        return self.objective.model


def _to_device(t, device: torch.device):
    """A batch tensor, None, or a tuple of tensors (sparse tag ids + weights) on ``device``.

    Host tensors bound for a GPU go through pinned memory: ``non_blocking=True`` from pageable
    memory is a synchronous copy, from pinned memory it overlaps the step still running.
    """
    if isinstance(t, (tuple, list)):
        return tuple(_to_device(x, device) for x in t)
    if t is None or t.device == device:
        return t
    if device.type == "cuda" and t.device.type == "cpu" and not t.is_pinned():
        t = t.pin_memory()  # a host copy into torch's cached pinned blocks
    return t.to(device, non_blocking=True)


def stage_total_steps(optim: OptimConfig, steps_per_epoch: int) -> int:
    return max(1, math.ceil(optim.epochs * steps_per_epoch))


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


def train_step(engine: Engine, imgs: torch.Tensor, targets: Any, step: int, lr: float, clip_grad: float | None,
               accum: int, autocast) -> tuple[torch.Tensor, torch.Tensor | None]:
    """One optimizer step on this rank's share of global batch ``step``: its mean loss and, when the
    engine clips (``clip_grad`` not None; ``math.inf`` only measures), the global gradient norm before
    clipping (device tensors; None without clipping)."""
    engine.zero_grad()
    total = torch.zeros((), device=imgs.device)
    for m, (x, t) in enumerate(_micro_batches(imgs, targets, accum)):
        with engine.no_sync() if m < accum - 1 else nullcontext():  # communicate on the last micro-batch only
            with autocast:
                loss = engine.objective(x, t, step, m, accum)
            engine.backward(loss / accum if accum > 1 else loss)
        total += loss.detach()
    norm = engine.step(lr, clip_grad)
    return total / accum, norm


def _clip_for(clip_grad: float | None, log_step: bool) -> float | None:
    """The engine's clip threshold for one step. A stage that does not clip still logs its gradient
    norm: at log steps it clips at infinity, which computes the global norm and scales by exactly 1
    (the update is bit for bit the unclipped one); other steps skip the norm."""
    if clip_grad is not None:
        return clip_grad
    return math.inf if log_step else None


def _batches(loader: Loader, step: int) -> Iterator[tuple[torch.Tensor, Any]]:
    """This rank's batches from global step ``step`` on, epoch after epoch."""
    epoch, batch = divmod(step, loader.num_batches)
    while True:
        yield from loader.epoch(epoch, batch)
        epoch, batch = epoch + 1, 0


def start(stage: Stage, stage_dir: Path, parallel: ParallelConfig, run: RunConfig, mesh: Mesh, device: torch.device,
          total: int, echo: Callable[[str], None], compiled: CompileScope | None = None
          ) -> tuple[Engine, Checkpointer, int]:
    """Initialise the model (``stage.init_fn``) or find the checkpoint to resume, apply parallelism
    (:func:`~maws_fast.train.parallelize.parallelize`: TP, activation checkpointing, compile in
    ``compiled``, the engine), and load that checkpoint (with the loader's position). Returns
    (engine, checkpointer, step)."""
    ckpts = list_checkpoints(stage_dir / "ckpt")
    if not ckpts and stage.init_fn is not None:
        msg = stage.init_fn()  # on the full model, before it is split and sharded
        if msg:
            echo(f"[{stage.name}] {msg}")
    frozen = frozen_tensors(stage.model)
    o = stage.optim
    groups = stage.param_groups(stage.model) if stage.param_groups else param_groups(stage.model, o.weight_decay)
    optimizer = AdamWSpec.of(stage.model, groups, betas=(o.beta1, o.beta2))  # by name: before TP splits the model
    engine = parallelize(stage.objective, mesh, parallel, run, optimizer, device, compiled=compiled)
    ckpt = Checkpointer(stage.name, stage_dir, stage.fingerprint, engine, stage.loader, mesh, parallel.zero_stage,
                        total, frozen)
    step = ckpt.resume_newest(ckpts, echo) if ckpts else 0
    if ckpts:  # frozen tensors come back as saved (a LiT's locked tower), not as a fresh model has them
        live = stage.model.state_dict()
        with torch.no_grad():
            for k, v in ckpt.frozen.items():
                t = live.get(k)
                # FSDP2 holds even frozen tensors as DTensor shards: those keep their init (the sin-cos
                # tables; the LiT stage, whose frozen tower is loaded, refuses FSDP2)
                if t is not None and type(t) is torch.Tensor:
                    t.copy_(v)
    return engine, ckpt, step


def run_stage(stage: Stage, out_dir: str | Path, run: RunConfig, device: torch.device,
              stop_at_step: int | None = None, echo: Callable[[str], None] = say,
              parallel: ParallelConfig | None = None, mesh: Mesh | None = None) -> Path | None:
    """Train ``stage`` to completion (resuming if a checkpoint exists) and return its final checkpoint.

    Every rank of the job calls this with the same arguments; rank 0 logs and writes the final
    weights, every rank writes its shard of each resumable checkpoint.

    Args:
        stage: what to train.
        out_dir: the run's output directory; the stage writes under ``out_dir/<stage.name>``.
        run: run settings (checkpoint / log intervals, progress bar, precision, activation checkpointing, compile).
        device: training device.
        stop_at_step: checkpoint and return None after this step (simulates an interruption).
        echo: where one-line status messages go (rank 0 only).
        parallel: engine, ZeRO stage, TP degree, gradient accumulation (default: ours, one process).
        mesh: the process mesh (default: one process).

    Returns:
        Path of ``out_dir/<name>/final`` (consolidated weights + meta), or None if stopped early.
    """
    mesh = mesh or single_process()
    run = resolve_run(run)  # automatic defaults (run_recipe has resolved them already; direct callers may not)
    parallel = resolve_parallel(parallel or ParallelConfig(), run.precision, mesh.dims.dp)
    echo = echo if mesh.rank == 0 else silent
    stage_dir = Path(out_dir) / stage.name
    if (stage_dir / "final").exists():
        meta = read_meta(stage_dir / "final")  # metadata only: a finished stage's weights are not needed here
        check_fingerprint(meta.get("fingerprint", {}), stage.fingerprint, stage_dir / "final")
        echo(f"[{stage.name}] already finished at step {meta['step']} ({stage_dir / 'final'}); skipping")
        return stage_dir / "final"

    o, spe = stage.optim, stage.loader.num_batches
    total = stage_total_steps(o, spe)
    # One compile scope for the whole stage, opened before parallelize compiles the blocks in it and
    # closed when training ends: dynamo's caches reset for this model, its recompile limit, one error.
    with compile_scope(stage.name, stage.model, run.compile) as compiled:
        engine, ckpt, step = start(stage, stage_dir, parallel, run, mesh, device, total, echo, compiled)
        stage.objective.train()
        log = StepLog(stage.name, stage_dir, stage.flops_per_image, stage.loader, run, mesh, total, step, device, echo)
        preempt = Preemption(mesh, device)  # SIGTERM / SIGUSR1 / SIGINT: checkpoint this step and stop
        try:
            final = _train(stage, engine, ckpt, log, preempt, step, total, run, parallel, mesh, device, stop_at_step,
                           echo)
            stop = preempt.agree_now() if final is not None else 0
        finally:
            preempt.close()
    if compiled is not None:
        echo(compiled.summary())
    if stop:  # it came during the last steps: the stage is done, the next one is not started
        raise Preempted(f"[{stage.name}] stopped by {signal_name(stop)} at the end of the stage ({final} written): "
                        "run the same command to go on with the next stage")
    return final


def _train(stage: Stage, engine: Engine, ckpt: Checkpointer, log: StepLog, preempt: Preemption, step: int,
           total: int, run: RunConfig, parallel: ParallelConfig, mesh: Mesh, device: torch.device,
           stop_at_step: int | None, echo: Callable[[str], None]) -> Path | None:
    """The steps of :func:`run_stage` from ``step`` on, then the final checkpoint (None when stopped early)."""
    o, spe = stage.optim, stage.loader.num_batches
    # bf16 autocast: matmuls in bf16; weights per parallel.param_dtype, AdamW state fp32 (no loss scaling needed).
    autocast = torch.autocast(device.type, dtype=torch.bfloat16, enabled=run.precision == "bf16")
    batches = _batches(stage.loader, step)
    t_start = time.perf_counter()
    try:
        while step < total:
            imgs, targets = next(batches)
            lr = lr_at(step / spe, o.abs_lr, o.min_lr, o.warmup_epochs, o.epochs)
            loss, norm = train_step(engine, _to_device(imgs, device), _to_device(targets, device), step, lr,
                                    _clip_for(o.clip_grad, log.is_log_step(step + 1)), parallel.grad_accum, autocast)
            step += 1
            progress(stage.name, step)  # what this rank's heartbeat reports
            stop = preempt.poll()  # the same answer on every rank
            at_ckpt = step < total and (step % run.ckpt_every == 0 or step == stop_at_step or bool(stop))
            log.after_step(step, loss, imgs.shape[0] * mesh.dims.dp, lr, sync=at_ckpt, grad_norm=norm)
            if at_ckpt:
                ckpt.save(step)
            if step == stop_at_step and step < total:
                return None
            if stop and step < total:
                raise Preempted(f"[{stage.name}] stopped by {signal_name(stop)} after step {step}/{total}; checkpoint "
                                f"{ckpt.ckpt_dir / f'step_{step:08d}'} written: run the same command to resume")
    finally:
        log.close()

    elapsed = time.perf_counter() - t_start
    final = ckpt.save_final(step, elapsed)  # collective: every rank takes part
    engine.close()
    echo(f"[{stage.name}] done: {total} steps in {elapsed:.1f} s -> {final}")
    return final
