"""The MAWS recipe as stages: MAE pre-pretraining -> WSP -> linear probe + few-shot.

Each training stage is a :class:`~maws_fast.train.loop.Stage` handed to the shared loop; this
module only says what data, model, loss and initialisation each stage uses.
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from pathlib import Path
from typing import Callable

import torch

from maws_fast.config import Config, resolve_defaults
from maws_fast.data import fmnist
from maws_fast.data.demo import DemoData, load_data
from maws_fast.data.loader import check_batch, jpeg_loader
from maws_fast.data.reference import BatchLoader
from maws_fast.errors import CheckpointError, ConfigError, UserError
from maws_fast.eval.evaluate import check_eval_config, feature_sets, probe_encoder, results_table
from maws_fast.models import build_classifier, build_mae, load_pretrained
from maws_fast.models.flops import flops_per_image
from maws_fast.parallel.mesh import Mesh, destroy, init_distributed
from maws_fast.seeds import Stream, mix_seed
from maws_fast.storage import WEIGHT_SUFFIXES, atomic_write_text, load_checkpoint, read_meta, read_weights
from maws_fast.train.checkpoint import check_fingerprint
from maws_fast.train.loop import Stage, run_stage, say, silent
from maws_fast.train.objectives import MAEObjective, WSPObjective

Echo = Callable[[str], None]
TRAINED = ("mae", "wsp")  # stages whose final/ weights a later stage's init can name


def _fingerprints(cfg: Config) -> dict[str, dict]:
    """The config each stage's result depends on (a changed one must not resume an old run)."""
    d = cfg.data
    data = {"dataset": d.dataset, "mean": d.mean, "std": d.std}
    if d.loader != "reference":  # another loader reads other samples in another order
        resolve = lambda p: str(Path(p).resolve()) if p else None  # noqa: E731
        data.update(loader=d.loader, format=d.format, train=resolve(d.train), wsp_train=resolve(d.wsp_train),
                    tags=resolve(d.tags), vocab=resolve(d.vocab), max_tags=d.max_tags)
    model = dataclasses.asdict(cfg.model)
    mae = {"seed": cfg.run.seed, "data": data, "model": model, "mae": dataclasses.asdict(cfg.mae)}
    wsp_cfg = {k: v for k, v in dataclasses.asdict(cfg.wsp).items() if k not in ("init", "compare_scratch")}
    wsp = {"seed": cfg.run.seed, "data": data, "model": model, "wsp": wsp_cfg}
    init = cfg.wsp.init if cfg.wsp.init in ("mae", "scratch") else str(Path(cfg.wsp.init).resolve())
    return {
        "mae": mae,
        "wsp": {**wsp, "init": init, **({"mae": mae} if init == "mae" else {})},
        "wsp_scratch": {**wsp, "init": "scratch"},
    }


def _data_shard(mesh: Mesh | None) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size): which share of each global batch this process reads.

    Tensor-parallel ranks of one DP rank read the same share (every TP rank sees the same batch).
    """
    return (0, 1) if mesh is None else (mesh.dp_rank, mesh.dims.dp)


def mae_stage(cfg: Config, data: DemoData | None, device: torch.device, mesh: Mesh | None = None) -> Stage:
    torch.manual_seed(mix_seed(cfg.run.seed, Stream.MAE_INIT))  # model init: the same weights on every rank
    model = build_mae(cfg.model, norm_pix_loss=cfg.mae.norm_pix_loss).to(device)
    m = cfg.mae
    rank, dp = _data_shard(mesh)
    if cfg.data.loader != "reference":
        loader = jpeg_loader(cfg, cfg.data.train, m.batch_size, m.crop_scale, m.flip_p, "none", device,
                             shard=(rank, dp), log=say)
    else:
        check_batch(m.batch_size, dp, cfg.parallel.grad_accum)
        loader = BatchLoader(
            data.train_x, None, m.batch_size, cfg.run.seed, cfg.data.mean, cfg.data.std,
            augment={"out_size": cfg.model.img_size, "scale": m.crop_scale, "flip_p": m.flip_p},
            num_workers=cfg.data.num_workers, shard=(rank, dp),
        )
    objective = MAEObjective(model, m.mask_ratio, cfg.run.seed, rank, dp)
    return Stage("mae", objective, loader, m, flops_per_image(cfg.model, "mae", mask_ratio=m.mask_ratio),
                 _fingerprints(cfg)["mae"])


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
        raise ConfigError(f"config: {key}: {init} does not exist; use {' | '.join(stages)}, or the path of a checkpoint "
                          f"directory or weights file ({', '.join(WEIGHT_SUFFIXES)})")
    if p.is_file() and p.suffix not in WEIGHT_SUFFIXES:
        raise ConfigError(f"config: {key}: {init} is not a weights file; use one of {', '.join(WEIGHT_SUFFIXES)} "
                          "or a checkpoint directory")


def wsp_stage(cfg: Config, data: DemoData | None, device: torch.device, name: str, init: str,
              mesh: Mesh | None = None) -> Stage:
    w = cfg.wsp
    rank, dp = _data_shard(mesh)
    if cfg.data.loader != "reference":
        loader = jpeg_loader(cfg, cfg.data.wsp_train or cfg.data.train, w.batch_size, w.crop_scale, w.flip_p, "tags",
                             device, shard=(rank, dp), log=say)
        num_tags = loader.source.num_classes
    else:
        check_batch(w.batch_size, dp, cfg.parallel.grad_accum)
        loader = BatchLoader(
            data.wsp_x, fmnist.tag_targets(data.wsp_tags), w.batch_size, cfg.run.seed, cfg.data.mean, cfg.data.std,
            augment={"out_size": cfg.model.img_size, "scale": w.crop_scale, "flip_p": w.flip_p},
            num_workers=cfg.data.num_workers, shard=(rank, dp),
        )
        num_tags = len(fmnist.VOCAB)
    torch.manual_seed(mix_seed(cfg.run.seed, Stream.WSP_INIT))  # same head / encoder init for every WSP variant
    model = build_classifier(cfg.model, num_classes=num_tags).to(device)

    def init_fn() -> str | None:
        if init == "scratch":
            return "encoder initialised from scratch (random init)"
        path = init_path(cfg, init)
        if not path.exists():
            hint = ("run the mae stage first (--run.stages=[mae,wsp,linprobe]) or set --wsp.init=scratch"
                    if init == "mae" else "point --wsp.init at an MAE or ViT checkpoint")
            raise CheckpointError(f"wsp.init={init!r} needs {path}, which does not exist; {hint}")
        report = load_pretrained(model, read_weights(path), source=str(path))
        missing = [k for k in report.initialised if not k.startswith("head.")]
        if missing:
            # A file that fits nothing would silently train from scratch under an "MAE -> WSP" label.
            raise CheckpointError(f"{path} lacks encoder tensors {missing[:6]} ({len(missing)} in all); "
                                  f"--wsp.init must point at an MAE or ViT checkpoint of this model config")
        return f"encoder initialised from {path}: {report.summary()}"

    fp = _fingerprints(cfg)["wsp_scratch" if init == "scratch" else "wsp"]
    return Stage(name, WSPObjective(model), loader, w, flops_per_image(cfg.model, "wsp", num_tags), fp, init_fn)


def wsp_runs(cfg: Config) -> list[tuple[str, str, str]]:
    """(stage name, init, table label) of every WSP model this config trains."""
    label = {"mae": "MAE -> WSP", "scratch": "WSP (random init)"}.get(cfg.wsp.init, f"{cfg.wsp.init} -> WSP")
    runs = [("wsp", cfg.wsp.init, label)]
    if cfg.wsp.compare_scratch and cfg.wsp.init != "scratch":
        runs.append(("wsp_scratch", "scratch", "WSP (random init)"))
    return runs


# --- evaluation --------------------------------------------------------------------------------
def evaluate(cfg: Config, data: DemoData | None, device: torch.device, echo: Echo) -> list[dict]:
    """Linear probe and k-shot on frozen cls features of every finished encoder of this run."""
    out = Path(cfg.run.out_dir)
    candidates = [(name, label) for name, _, label in wsp_runs(cfg)] + [("mae", "MAE only (no WSP)")]
    fingerprints = _fingerprints(cfg)
    feats, num_classes = feature_sets(cfg, data, device, log=say)
    rows = []
    for name, label in candidates:
        final = out / name / "final"
        if not final.exists():
            continue
        tensors, meta, _ = load_checkpoint(final)
        check_fingerprint(meta.get("fingerprint", {}), fingerprints[name], final)
        model = build_classifier(cfg.model, num_classes=0).to(device)
        report = load_pretrained(model, tensors, source=str(final))
        if report.initialised:
            raise CheckpointError(f"{final} lacks encoder tensors {report.initialised[:4]}; it cannot be evaluated")
        steps = f"{name.split('_')[0]} {meta['step']}"
        if name == "wsp" and cfg.wsp.init == "mae":
            steps = f"mae {read_meta(out / 'mae' / 'final')['step']} + {steps}"
        row = {"model": label, "stage": name, "train_steps": steps, **probe_encoder(cfg, model, feats, num_classes)}
        echo(f"[linprobe] {label}: linear probe {100 * row['linear_probe_top1']:.2f}%"
             + "".join(f", {k}-shot {100 * row[f'{k}shot_top1_mean']:.2f}%" for k in cfg.eval.shots))
        rows.append(row)
    if not rows:
        raise UserError(f"nothing to evaluate under {out}: run the mae and wsp stages first")
    return rows


# --- the whole recipe ----------------------------------------------------------------------------
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
    out = check_out_dir(cfg.run.out_dir)
    device = torch.device(cfg.run.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config: run.device: cuda requested but torch sees no CUDA device; use --run.device=cpu")
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    mesh = init_distributed(tp=cfg.parallel.tp, device=device, backend=cfg.parallel.backend)
    try:
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
        destroy()


def _run_stages(cfg: Config, out: Path, device: torch.device, mesh: Mesh, echo: Echo) -> dict:
    main = mesh.rank == 0
    if main:
        atomic_write_text(out / "config.json", cfg.to_json())
    data = load_data(cfg)
    # Everything that can be checked before hours of training is checked here.
    if "linprobe" in cfg.run.stages:
        check_eval_config(cfg, data)
    if "wsp" in cfg.run.stages:
        check_init("wsp.init", cfg.wsp.init, ("mae",))
    summary: dict = {"stages": {}, "results": []}
    train = dict(parallel=cfg.parallel, mesh=mesh, echo=echo)
    if "mae" in cfg.run.stages:
        summary["stages"]["mae"] = str(run_stage(mae_stage(cfg, data, device, mesh), out, cfg.run, device, **train))
    if "wsp" in cfg.run.stages:
        for name, init, _ in wsp_runs(cfg):
            stage = wsp_stage(cfg, data, device, name, init, mesh)
            summary["stages"][name] = str(run_stage(stage, out, cfg.run, device, **train))
    if "linprobe" in cfg.run.stages and main:  # frozen-feature probes are small: rank 0 runs them alone
        rows = evaluate(cfg, data, device, echo)
        summary["results"] = rows
        atomic_write_text(out / "results.json", json.dumps(rows, indent=2))
        table = results_table(rows, cfg.eval.shots)
        atomic_write_text(out / "results.md", table + "\n")
        echo("\n" + table)
    return summary
