"""What a config trains: every stage's name, init and table label, and the config each result depends on.

The recipe (:mod:`maws_fast.train.recipe`) and the stage modules both
read these; nothing here builds a model or touches data.
"""
from __future__ import annotations

import dataclasses
from pathlib import Path

from maws_fast.config import Config, resolve_parallel, resolve_run
from maws_fast.errors import ConfigError
from maws_fast.parallel.mesh import Mesh
from maws_fast.storage import WEIGHT_SUFFIXES

TRAINED = ("mae", "wsp", "wsp_scratch")  # stages whose final/ weights a later stage's init can name


def _section(section) -> dict:
    """A stage's section as its fingerprint records it: the fields, with ``augment``'s crop and flip
    flat among them, as they were before ``augment`` was a section (checkpoints made then still resume)."""
    out = dataclasses.asdict(section)
    return {**{k: v for k, v in out.items() if k != "augment"}, **out.get("augment", {})}


def fingerprints(cfg: Config) -> dict[str, dict]:
    """The config each stage's result depends on (a changed one must not resume an old run): the
    seed, the data, the model (its kernel and attention backends too), the stage's own section, and
    the numerics (resolved precision, weight dtype, gradient accumulation). Not in it, so free to
    change on resume: the world size and TP layout (checkpoints reshard), the engine and ZeRO stage
    (while the resolved weight dtype stays: ``param_dtype=auto`` gives DDP fp32 weights), checkpoint /
    log intervals, progress display, threads, compile and activation checkpointing."""
    d = cfg.data
    data = {"dataset": d.dataset, "mean": d.mean, "std": d.std}
    resolve = lambda p: str(Path(p).resolve()) if p else None  # noqa: E731
    if d.loader != "reference":  # another loader reads other samples in another order
        data.update(loader=d.loader, format=d.format, train=resolve(d.train), wsp_train=resolve(d.wsp_train),
                    tags=resolve(d.tags), vocab=resolve(d.vocab), max_tags=d.max_tags)
    model = dataclasses.asdict(cfg.model)  # the kernel and attention backends included
    # how the numbers are computed: the compute dtype, the weights' dtype, the micro-batch split
    precision = resolve_run(cfg.run).precision
    numerics = {"precision": precision, "param_dtype": resolve_parallel(cfg.parallel, precision, 1).param_dtype,
                "grad_accum": cfg.parallel.grad_accum}
    mae = {"seed": cfg.run.seed, "numerics": numerics, "data": data, "model": model, "mae": _section(cfg.mae)}
    wsp_cfg = {k: v for k, v in _section(cfg.wsp).items() if k not in ("init", "compare_scratch")}
    wsp = {"seed": cfg.run.seed, "numerics": numerics, "data": data, "model": model, "wsp": wsp_cfg}
    init = cfg.wsp.init if cfg.wsp.init in ("mae", "scratch") else str(Path(cfg.wsp.init).resolve())
    out = {
        "mae": mae,
        "wsp": {**wsp, "init": init, **({"mae": mae} if init == "mae" else {})},
        "wsp_scratch": {**wsp, "init": "scratch"},
    }
    f = cfg.finetune
    ft_cfg = {k: v for k, v in _section(f).items() if k not in ("init", "compare")}
    ft_data = dict(data, eval_train=resolve(d.eval_train)) if d.loader != "reference" else data
    ft = {"seed": cfg.run.seed, "numerics": numerics, "data": ft_data, "model": dataclasses.asdict(finetune_model_config(cfg)),
          "finetune": ft_cfg}
    for name, ft_init, _ in finetune_runs(cfg):
        src = out[ft_init] if ft_init in out else str(Path(ft_init).resolve())
        out[name] = {**ft, "init": ft_init if ft_init in out else src, **({"from": src} if ft_init in out else {})}
    lit_cfg = {k: v for k, v in _section(cfg.lit).items() if k not in ("init", "compare", "tokenizer")}
    lit_data = dict(data, lit_train=resolve(d.lit_train), captions=resolve(d.captions)) if d.loader != "reference" else data
    lit = {"seed": cfg.run.seed, "numerics": numerics, "data": lit_data, "model": model, "lit": lit_cfg}
    for name, lit_init, _ in lit_runs(cfg):
        src = out[lit_init] if lit_init in out else str(Path(lit_init).resolve())
        out[name] = {**lit, "init": lit_init if lit_init in out else src, **({"from": src} if lit_init in out else {})}
    return out


def data_shard(mesh: Mesh | None) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size): which share of each global batch this process reads.

    Tensor-parallel ranks of one DP rank read the same share (every TP rank sees the same batch).
    """
    return (0, 1) if mesh is None else (mesh.dp_rank, mesh.dims.dp)


def init_path(cfg: Config, init: str) -> Path:
    """The checkpoint an ``init`` setting names: a training stage of this run (its ``final/``
    directory) or a path in any format :func:`~maws_fast.storage.read_weights` reads."""
    if init in TRAINED:
        return Path(cfg.run.out_dir) / init / "final"
    return Path(init)


def check_init(key: str, init: str, stages: tuple[str, ...]) -> None:
    """Before any training: a path ``init`` must exist and have a weights format (a stage name
    is checked when its stage has run)."""
    if init in stages or init == "scratch":
        return
    p = Path(init)
    if not p.exists():
        raise ConfigError(f"config: {key}: {init} does not exist; use {' | '.join(stages)}, or the path of a "
                          f"checkpoint directory or weights file ({', '.join(WEIGHT_SUFFIXES)})")
    if p.is_file() and p.suffix not in WEIGHT_SUFFIXES:
        raise ConfigError(f"config: {key}: {init} is not a weights file; use one of {', '.join(WEIGHT_SUFFIXES)} "
                          "or a checkpoint directory")


def wsp_runs(cfg: Config) -> list[tuple[str, str, str]]:
    """(stage name, init, table label) of every WSP model this config trains."""
    label = {"mae": "MAE -> WSP", "scratch": "WSP (random init)"}.get(cfg.wsp.init, f"{cfg.wsp.init} -> WSP")
    runs = [("wsp", cfg.wsp.init, label)]
    if cfg.wsp.compare_scratch and cfg.wsp.init != "scratch":
        runs.append(("wsp_scratch", "scratch", "WSP (random init)"))
    return runs


ENCODER_LABELS = {"mae": "MAE only (no WSP)", "wsp_scratch": "WSP (random init)"}


def _encoder_label(cfg: Config, init: str) -> str:
    if init == "wsp":
        return wsp_runs(cfg)[0][2]
    return ENCODER_LABELS.get(init, init)


def finetune_runs(cfg: Config) -> list[tuple[str, str, str]]:
    """(stage name, init, table label) of every fine-tune this config runs: ``finetune`` from
    ``finetune.init``, then ``finetune_<name>`` from each of ``finetune.compare``."""
    f = cfg.finetune
    runs = [("finetune", f.init, f"{_encoder_label(cfg, f.init)} -> FT")]
    runs += [(f"finetune_{c}", c, f"{_encoder_label(cfg, c)} -> FT") for c in f.compare]
    return runs


def finetune_model_config(cfg: Config):
    """The model config at the fine-tune resolution (``finetune.img_size``, 0 = the model's)."""
    size = cfg.finetune.img_size or cfg.model.img_size
    return cfg.model if size == cfg.model.img_size else dataclasses.replace(cfg.model, img_size=size)


def lit_runs(cfg: Config) -> list[tuple[str, str, str]]:
    """(stage name, image tower, table label) of every LiT run: ``lit`` on ``lit.init``, then
    ``lit_<name>`` on each of ``lit.compare``."""
    runs = [("lit", cfg.lit.init, f"{_encoder_label(cfg, cfg.lit.init)} -> LiT")]
    runs += [(f"lit_{c}", c, f"{_encoder_label(cfg, c)} -> LiT") for c in cfg.lit.compare]
    return runs
