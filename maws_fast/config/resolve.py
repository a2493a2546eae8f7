"""Defaults that depend on the device and the world size, made concrete once a run starts."""
from __future__ import annotations

import dataclasses

from maws_fast.config.schema import Config, ParallelConfig, RunConfig


def resolve_run(run: RunConfig) -> RunConfig:
    """``run`` with ``precision="auto"`` made concrete: bf16 on cuda, fp32 on cpu (exact tests and demo)."""
    if run.precision != "auto":
        return run
    return dataclasses.replace(run, precision="bf16" if run.device.startswith("cuda") else "fp32")


def resolve_parallel(par: ParallelConfig, precision: str, dp_world: int) -> ParallelConfig:
    """``par`` with its automatic fields made concrete for a run of ``precision`` (resolved) on a
    data-parallel world of ``dp_world``: ZeRO stage 0 when there is nothing to shard, else 2; bf16
    weights (fp32 master and AdamW state in the engine) with bf16 compute unless DDP keeps fp32."""
    out = par
    if par.zero_stage is None:
        out = dataclasses.replace(out, zero_stage=0 if dp_world == 1 else 2)
    if par.param_dtype == "auto":
        bf16 = precision == "bf16" and par.engine != "ddp"
        out = dataclasses.replace(out, param_dtype="bf16" if bf16 else "fp32")
    return out


def resolve_defaults(cfg: Config, dp_world: int) -> tuple[Config, list[str]]:
    """The config with every automatic default made concrete, and one line per default chosen.

    Called once at start (after the process group is up, so the data-parallel world is known);
    the lines are printed, and the resolved config is what ``config.json`` and checkpoints record.
    """
    run = resolve_run(cfg.run)
    par = resolve_parallel(cfg.parallel, run.precision, dp_world)
    lines = []
    if cfg.run.precision == "auto":
        lines.append(f"run.precision={run.precision} (auto for {run.device})")
    if cfg.parallel.param_dtype == "auto":
        why = "ddp keeps fp32 weights" if par.engine == "ddp" and run.precision == "bf16" else f"run.precision={run.precision}"
        lines.append(f"parallel.param_dtype={par.param_dtype} (auto: {why}; master weights and AdamW state fp32)")
    if cfg.parallel.zero_stage is None and par.engine == "ours":
        lines.append(f"parallel.zero_stage={par.zero_stage} (auto: data-parallel world {dp_world})")
    if run.device.startswith("cuda"):
        lines.append(f"run.tf32={'on' if run.tf32 else 'off'} (fp32 matmuls and convolutions); host batches pinned, "
                     "copied with non_blocking")
    return dataclasses.replace(cfg, run=run, parallel=par), lines
