"""What a training stage checkpoints, how it resumes, and the guard that never resumes another config.

The files themselves are written by :mod:`maws_fast.storage` (atomic writes, the single-process
format of ``final/``) and :mod:`maws_fast.parallel.checkpoint` (the sharded ``step_*`` format).
"""
from __future__ import annotations

import json
import shutil
from collections.abc import Callable
from pathlib import Path

import torch
import torch.nn as nn
from maws_kernels import tuning

from maws_fast.data.loader import Loader
from maws_fast.errors import CheckpointDamaged, CheckpointError
from maws_fast.parallel.checkpoint import load_sharded, save_sharded
from maws_fast.parallel.engine import Engine, consolidated_state_dict
from maws_fast.parallel.mesh import Mesh, all_gather_objects
from maws_fast.storage import read_meta, save_checkpoint
from maws_fast.train.metrics import drop_rows_after


def config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out


def check_fingerprint(saved: dict, fingerprint: dict, where: Path) -> None:
    """Raise CheckpointError naming the changed keys if ``where`` was made under another config."""
    current = json.loads(json.dumps(fingerprint))  # tuples -> lists, as they were saved
    if "numerics" not in saved:  # saved before the fingerprint recorded the numerics: not comparable
        current.pop("numerics", None)
    diff = config_diff(saved, current)
    if diff:
        raise CheckpointError(
            f"{where} was made with a different config ({'; '.join(diff[:6])}). Resuming it would mix two runs: "
            f"use a new --run.out_dir, or delete {where.parent if where.name == 'final' else where.parent.parent} to start over"
        )


def move_aside(path: Path, why: str) -> Path:
    """Move damaged checkpoint ``path`` into ``<its parent>/damaged/`` under a name no other takes,
    with ``why`` in ``DAMAGED.txt`` beside its files; returns where it went."""
    dest_dir = path.parent / "damaged"
    dest_dir.mkdir(exist_ok=True)
    dest, n = dest_dir / path.name, 1
    while dest.exists():
        dest, n = dest_dir / f"{path.name}.{n}", n + 1
    path.rename(dest)
    (dest / "DAMAGED.txt").write_text(why + "\n")
    return dest


def frozen_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Copies of the state-dict entries that are not trainable parameters (the sin-cos pos-embeds).

    Taken before parallelism is applied (a bf16 engine casts them, TP never splits them): they
    are not sharded, rank 0 stores them whole in every checkpoint.
    """
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    # on the host: a LiT stage's whole locked image tower is frozen, and a second copy on the GPU for the
    # whole stage would cost as much as the tower
    return {k: v.detach().to("cpu", copy=True) for k, v in model.state_dict().items() if k not in trainable}


class Checkpointer:
    """One stage's checkpoints: what each holds, every rank's shard of it, resume, the final export.

    ``step_*`` checkpoints are sharded (every rank writes its pieces and its loader's position;
    :mod:`maws_fast.parallel.checkpoint`); ``final`` is consolidated, single-process format,
    timm keys, written by rank 0.

    Args:
        name: the stage's name (its directory under the run's out_dir is ``stage_dir``).
        stage_dir: ``out_dir/<name>``; checkpoints go to ``ckpt/`` and ``final/`` under it.
        fingerprint: the config the stage's result depends on (never resumed under another).
        engine: the stage's engine (what is saved and loaded).
        loader: the stage's loader (its reader position is saved per rank).
        mesh: the process mesh.
        zero_stage: parallel.zero_stage (recorded for engine=ours).
        total_steps: the stage's length (its steps per epoch are the loader's).
        frozen: :func:`frozen_tensors` of the model.
    """

    def __init__(self, name: str, stage_dir: Path, fingerprint: dict, engine: Engine, loader: Loader, mesh: Mesh,
                 zero_stage: int, total_steps: int, frozen: dict[str, torch.Tensor]):
        self.name, self.stage_dir, self.fingerprint = name, stage_dir, fingerprint
        self.engine, self.loader, self.mesh, self.zero_stage = engine, loader, mesh, zero_stage
        self.total, self.spe, self.frozen = total_steps, loader.num_batches, frozen
        self.ckpt_dir, self.final_dir = stage_dir / "ckpt", stage_dir / "final"
        self.tuning_problems: list[str] = []  # autotuned choices the last load could not restore

    def meta(self, step: int) -> dict:
        e, dims = self.engine, self.mesh.dims
        return {"stage": self.name, "step": step, "total_steps": self.total, "steps_per_epoch": self.spe,
                "fingerprint": self.fingerprint, "optim_steps": e.step_count,
                "parallel": {"engine": e.name, "world": dims.world, "tp": dims.tp,
                             "zero_stage": self.zero_stage if e.name == "ours" else None}}

    def rank_meta(self) -> dict:
        # reader position + bad-sample record of THIS rank's loader, and the configs THIS process's
        # autotuned kernels picked (another pick rounds differently): exact resume
        return {"data_state": self.loader.state_dict(), "kernel_tuning": tuning.choices()}

    def save(self, step: int) -> None:
        """Every rank writes its shard of ``ckpt/step_<step>``; the two newest are kept. Collective."""
        main = self.mesh.rank == 0
        save_sharded(self.ckpt_dir, f"step_{step:08d}", rank=self.mesh.rank, world=self.mesh.dims.world,
                     pieces=self.engine.pieces(), tensors=self.engine.shard_tensors(),
                     extra=self.frozen if main else {}, meta=self.meta(step), rank_meta=self.rank_meta(),
                     barrier=self.mesh.barrier, keep=2)

    def resume(self, path: Path, echo: Callable[[str], None]) -> int:
        """Load sharded checkpoint ``path`` into the engine and the loader; returns the step to continue from."""
        step, saved_world = self._load(path)
        self._resumed(path, step, saved_world, echo)
        return step

    def _load(self, path: Path) -> tuple[int, int | None]:
        """The loading half of :meth:`resume`: (step, the world that saved it)."""
        if (path / "optim.safetensors").is_file() and not (path / "rank_00000.json").exists():
            raise CheckpointError(
                f"{path} is a resumable checkpoint in the single-process format of maws_fast versions before sharded "
                f"checkpoints, which no longer resume. Its weights ({path / 'model.safetensors'}, timm keys) still "
                f"load as an init (e.g. --wsp.init or --finetune.init); to run the stage again, delete {self.ckpt_dir}")
        check_fingerprint(read_meta(path).get("fingerprint", {}), self.fingerprint, path)
        tensors, extra, meta, rank_metas = load_sharded(path, self.engine.load_pieces(), with_optim=True)
        optim_steps = int(meta["optim_steps"])
        # the frozen tensors as saved (a LiT stage's locked image tower: loaded by its init_fn, which a
        # resumed stage does not run); the caller copies them into the model
        self.frozen = {k: extra.get(k, v) for k, v in self.frozen.items()}
        self.engine.load_shard_tensors(tensors, optim_steps)
        step = int(meta["step"])
        if self.loader.state_dict() is not None:  # a JPEG loader: its reader position is one per process
            if len(rank_metas) != self.mesh.dims.world:
                raise CheckpointError(
                    f"{path} was saved by {len(rank_metas)} processes; the {type(self.loader).__name__}'s reader "
                    f"position is per process, so resume it with {len(rank_metas)} processes (model and optimizer "
                    "state reshard to any layout; the in-memory reference loader resumes at any world size)")
            data_state = rank_metas[self.mesh.rank].get("data_state")
            if data_state is not None:
                self.loader.load_state_dict(data_state)  # the reader resumes where it stopped
        # This rank's autotuned picks (rank 0's when the world grew), before the first launch: the resumed
        # process launches the tiles the saved one did instead of timing the candidates again.
        own = rank_metas[self.mesh.rank] if self.mesh.rank < len(rank_metas) else rank_metas[0]
        self.tuning_problems = tuning.restore(own.get("kernel_tuning"))
        return step, meta.get("parallel", {}).get("world")

    def _resumed(self, path: Path, step: int, saved_world: int | None, echo: Callable[[str], None]) -> None:
        """Once every rank loaded ``path``: drop the metric rows past it, say so."""
        if self.mesh.rank == 0:
            metrics = self.stage_dir / "metrics.jsonl"
            _, bad = drop_rows_after(metrics, step)  # rows past the checkpoint are re-logged
            if bad:
                echo(f"[{self.name}] WARNING: dropped {len(bad)} line(s) of {metrics} that are not JSON rows (torn or "
                     f"garbled; line {', '.join(map(str, bad[:5]))}{' ...' if len(bad) > 5 else ''})")
        echo(f"[{self.name}] resuming from {path} at step {step}/{self.total}"
             + (f" (saved by {saved_world} processes, resharded)" if saved_world not in (None, self.mesh.dims.world)
                else ""))
        problems = self.tuning_problems
        if problems:
            echo(f"[{self.name}] WARNING: {len(problems)} autotuned kernel choice(s) of {path.name} could not be "
                 f"restored, so those shapes are tuned again and may round differently: {problems[0]}"
                 + (f" (+{len(problems) - 1} more)" if len(problems) > 1 else ""))

    def resume_newest(self, ckpts: list[Path], echo: Callable[[str], None]) -> int:
        """Resume from the newest of ``ckpts`` (oldest first) that loads on every rank. A damaged one
        (:class:`CheckpointDamaged` on any rank: a file missing, truncated, unreadable or failing its
        checksum) is moved aside into ``ckpt/damaged/`` (never deleted) with a warning naming what is
        wrong, and the previous one is tried. Collective: the ranks agree on each attempt."""
        for path in reversed(ckpts):
            why = None
            try:
                step, saved_world = self._load(path)
            except CheckpointDamaged as e:
                why = str(e)
            reasons = [r for r in all_gather_objects(why, self.mesh) if r is not None]
            if not reasons:
                self._resumed(path, step, saved_world, echo)
                return step
            if self.mesh.rank == 0:
                aside = move_aside(path, reasons[0])
                echo(f"[{self.name}] WARNING: checkpoint {path.name} is damaged ({reasons[0]}); moved it to {aside} "
                     f"and falling back to the previous one")
            self.mesh.barrier()  # nobody lists or reads the directory while rank 0 moves it
        raise CheckpointError(f"[{self.name}] no complete checkpoint is left under {self.ckpt_dir} (the damaged ones "
                              f"are in {self.ckpt_dir / 'damaged'}); run again to start the stage over, or restore one")

    def save_final(self, step: int, train_seconds: float) -> Path:
        """Consolidate the weights (collective), rank 0 writes ``final/`` and drops ``ckpt/``; every rank
        returns once it is there."""
        weights = consolidated_state_dict(self.engine, self.mesh)
        if self.mesh.rank == 0:
            save_checkpoint(self.stage_dir, "final", {**self.frozen, **weights},
                            {**self.meta(step), "done": True, "train_seconds": round(train_seconds, 2)})
            # the final checkpoint supersedes the resumable ones; damaged ones moved aside stay for a person
            for p in (self.ckpt_dir.iterdir() if self.ckpt_dir.is_dir() else []):
                if p.name != "damaged":
                    shutil.rmtree(p, ignore_errors=True) if p.is_dir() else p.unlink(missing_ok=True)
            if self.ckpt_dir.is_dir() and not any(self.ckpt_dir.iterdir()):
                self.ckpt_dir.rmdir()
        self.mesh.barrier()  # nobody moves on (and reads final) before rank 0 has written it
        return self.final_dir
