"""The MAWS recipe as a table: one row per kind of stage, run in the table's order.

``mae`` -> ``wsp`` (+ ``wsp_scratch``) -> ``finetune`` (+ ``finetune_<init>``) -> ``lit``
(+ ``lit_<init>``) -> ``linprobe`` (frozen-feature probes, few-shot, and the other kinds' columns in
the results table); ``run.stages`` picks the kinds. A row says what the kind trains (its runs:
stage name, init, table label), how one run is built (a :class:`~maws_fast.train.loop.Stage` for
the shared loop), what is checked before any stage trains, what rank 0 does once every run of the
kind has trained, and what it adds to the results table. Each kind's own module holds those
functions (``mae.py``, ``wsp.py``, ``finetune.py``, ``lit.py``, ``evaluation.py``); adding a stage is
one module and one row here (and its config section, see docs/ARCHITECTURE.md).
"""
from __future__ import annotations

import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from maws_kernels import backend_problem
from maws_kernels.nn import attention_backend_problem

from maws_fast.config import Config, resolve_defaults
from maws_fast.data.demo import DemoData, load_data
from maws_fast.errors import ConfigError, UserError
from maws_fast.parallel.mesh import Mesh, all_gather_objects, destroy, init_distributed
from maws_fast.parallel.watchdog import start_watchdog, stop_watchdog
from maws_fast.storage import acquire_run_lock, atomic_write_text, release_run_lock
from maws_fast.train.evaluation import Report, check_linprobe_config, evaluate_run, report_finetunes, report_zero_shot
from maws_fast.train.finetune import check_finetune_config, finetune_evals, finetune_stage
from maws_fast.train.lit import check_lit_config, lit_stage
from maws_fast.train.loop import Stage, run_stage, say, silent
from maws_fast.train.mae import mae_runs, mae_stage
from maws_fast.train.runs import check_init, finetune_runs, lit_runs, wsp_runs
from maws_fast.train.wsp import check_wsp_config, wsp_stage

Echo = Callable[[str], None]


@dataclass(frozen=True)
class Inputs:
    """What every stage of one recipe run is built from."""

    cfg: Config
    data: DemoData | None
    device: torch.device
    mesh: Mesh
    out: Path
    echo: Echo

    @property
    def main(self) -> bool:
        return self.mesh.rank == 0


@dataclass(frozen=True)
class StageKind:
    """One row of the recipe.

    Attributes:
        name: the kind's name in ``run.stages``.
        runs: (stage name, init, table label) of every model the kind trains under a config.
        build: one run's :class:`Stage`, from the inputs, its stage name and its init.
        check: raises before any stage trains if the config or the data cannot serve the kind.
        finish: rank 0, once every run of the kind has trained (the fine-tunes' held-out evaluation;
            the probes, which return the results table's rows).
        report: the kind's columns in the results table, added by the ``linprobe`` kind.
    """

    name: str
    runs: Callable[[Config], list[tuple[str, str, str]]]
    build: Callable[[Inputs, str, str], Stage] | None
    check: Callable[[Config, DemoData | None], None]
    finish: Callable[[Inputs], list[dict] | None] | None = None
    report: Report | None = None


def _no_check(cfg: Config, data: DemoData | None) -> None:
    pass


def _check_lit(cfg: Config, data: DemoData | None) -> None:
    check_lit_config(cfg, data)
    check_init("lit.init", cfg.lit.init, ("mae", "wsp", "wsp_scratch"))


def _no_runs(cfg: Config) -> list[tuple[str, str, str]]:
    return []


def _evaluate(i: Inputs) -> list[dict]:
    reports = tuple(k.report for k in RECIPE if k.report is not None and k.name in i.cfg.run.stages)
    return evaluate_run(i.cfg, i.data, i.device, i.out, i.echo, reports)


RECIPE: tuple[StageKind, ...] = (
    StageKind("mae", mae_runs, lambda i, name, init: mae_stage(i.cfg, i.data, i.device, i.mesh), _no_check),
    StageKind("wsp", wsp_runs, lambda i, name, init: wsp_stage(i.cfg, i.data, i.device, name, init, i.mesh),
              check_wsp_config),
    StageKind("finetune", finetune_runs,
              lambda i, name, init: finetune_stage(i.cfg, i.data, i.device, name, init, i.mesh), check_finetune_config,
              finish=lambda i: finetune_evals(i.cfg, i.data, i.device, i.echo), report=report_finetunes),
    StageKind("lit", lit_runs,
              lambda i, name, init: lit_stage(i.cfg, i.data, i.device, name, init, i.out, i.mesh, write=i.main),
              _check_lit, report=report_zero_shot),
    StageKind("linprobe", _no_runs, None, check_linprobe_config, finish=_evaluate),
)


def check_device(cfg: Config, device: torch.device) -> None:
    """The device exists and runs the model's attention and kernel backends: one ConfigError naming
    the option and the fix, before anything is written, instead of a traceback at the first forward."""
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config: run.device: cuda requested but torch sees no CUDA device; use --run.device=cpu")
    m = cfg.model
    why = attention_backend_problem(m.attn_backend, device)
    if why is not None:
        raise ConfigError(f"config: model.attn_backend: {m.attn_backend} cannot run on {device.type} here: {why}; "
                          f"use --model.attn_backend=sdpa" + (" (or --run.device=cuda on a GPU machine)"
                                                             if device.type != "cuda" else ""))
    why = backend_problem(m.kernel_backend, device) if m.kernel_backend is not None else None
    if why is not None:
        raise ConfigError(f"config: model.kernel_backend: {m.kernel_backend} cannot run on {device.type} here: {why}; "
                          "use --model.kernel_backend=null (the best available) or torch")


def check_out_dir(path: str | Path) -> Path:
    """Create the output directory and prove it is writable, before any work is done."""
    p = Path(path)
    probe = p / f".write-test-{uuid.uuid4().hex[:8]}"
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output directory {p} is not writable ({e.strerror or e}); pass --run.out_dir=DIR "
                        f"pointing at a writable directory") from None
    return p


def run_recipe(cfg: Config, echo: Echo = say) -> dict:
    """Run the configured stages in order; returns {"stages": {...}, "results": [...]}.

    Under torchrun every process runs this; they train together (cfg.parallel), rank 0 logs,
    writes the final weights and runs the evaluation.
    """
    device = torch.device(cfg.run.device)
    check_device(cfg, device)  # before any file is written
    out = check_out_dir(cfg.run.out_dir)
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    mesh = init_distributed(tp=cfg.parallel.tp, device=device, backend=cfg.parallel.backend,
                            timeout_s=cfg.parallel.timeout_s)
    lock, dog = None, None
    try:
        dog = start_watchdog(cfg.parallel.stall_timeout_s, mesh.rank, mesh.dims.world)
        lock = _lock_out_dir(out, mesh, echo)
        if mesh.distributed and device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (LOCAL_RANK)
        if mesh.rank != 0:
            echo = silent  # one log, from rank 0
        cfg, chosen = resolve_defaults(cfg, mesh.dims.dp)
        for line in chosen:
            echo(f"[defaults] {line}")
        if device.type == "cuda" and cfg.run.tf32:
            torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matmuls
            torch.backends.cudnn.allow_tf32 = True
        return _run_stages(cfg, out, device, mesh, echo)
    finally:
        if lock is not None:
            release_run_lock(lock)
        stop_watchdog(dog)
        destroy()


def _lock_out_dir(out: Path, mesh: Mesh, echo: Echo) -> Path | None:
    """Rank 0 takes the output directory's lock (one job per out_dir); every rank raises the same
    error when it cannot, so no rank waits for the others. Returns the lock on rank 0."""
    lock, err = None, None
    if mesh.rank == 0:
        try:
            lock = acquire_run_lock(out, echo)
        except UserError as e:
            err = str(e)
    errs = [e for e in all_gather_objects(err, mesh) if e]
    if errs:
        raise UserError(errs[0])
    return lock


def _run_stages(cfg: Config, out: Path, device: torch.device, mesh: Mesh, echo: Echo) -> dict:
    if mesh.rank == 0:
        atomic_write_text(out / "config.json", cfg.to_json())
    inputs = Inputs(cfg, load_data(cfg), device, mesh, out, echo)
    kinds = [k for k in RECIPE if k.name in cfg.run.stages]
    for kind in kinds:  # everything that can be checked before hours of training is checked here
        kind.check(cfg, inputs.data)
    summary: dict = {"stages": {}, "results": []}
    for kind in kinds:
        for name, init, _ in kind.runs(cfg):
            stage = kind.build(inputs, name, init)
            summary["stages"][name] = str(run_stage(stage, out, cfg.run, device, parallel=cfg.parallel, mesh=mesh,
                                                    echo=echo))
        # after every run of the kind has trained: the other ranks never wait on rank 0 mid-kind
        if kind.finish is not None and inputs.main:
            rows = kind.finish(inputs)
            if rows is not None:
                summary["results"] = rows
    return summary
