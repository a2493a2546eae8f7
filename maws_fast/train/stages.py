"""The MAWS recipe as stages: MAE pre-pretraining -> WSP -> fine-tune -> linear probe + few-shot.

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
from maws_fast.data.batching import FinetuneAugment, TrainAugment
from maws_fast.data.randaug import parse_rand_policy
from maws_fast.data.demo import DemoData, load_data
from maws_fast.data.loader import check_batch, eval_format, jpeg_loader
from maws_fast.data.reference import BatchLoader
from maws_fast.data.sources import open_source
from maws_fast.errors import CheckpointError, ConfigError, UserError
from maws_fast.eval.evaluate import check_eval_config, feature_sets, probe_encoder, results_table
from maws_fast.models import build_classifier, build_mae, load_pretrained
from maws_fast.models.vit import unwrap_state_dict
from maws_fast.models.flops import flops_per_image
from maws_fast.parallel.mesh import Mesh, destroy, init_distributed
from maws_fast.seeds import Stream, mix_seed
from maws_fast.storage import WEIGHT_SUFFIXES, atomic_write_text, load_checkpoint, read_meta, read_weights
from maws_fast.train.checkpoint import check_fingerprint
from maws_fast.train.loop import Stage, run_stage, say, silent
from maws_fast.train.mixup import Mixup
from maws_fast.train.objectives import FinetuneObjective, MAEObjective, WSPObjective
from maws_fast.train.optim import layer_decay_groups

Echo = Callable[[str], None]
TRAINED = ("mae", "wsp", "wsp_scratch")  # stages whose final/ weights a later stage's init can name


def _fingerprints(cfg: Config) -> dict[str, dict]:
    """The config each stage's result depends on (a changed one must not resume an old run)."""
    d = cfg.data
    data = {"dataset": d.dataset, "mean": d.mean, "std": d.std}
    resolve = lambda p: str(Path(p).resolve()) if p else None  # noqa: E731
    if d.loader != "reference":  # another loader reads other samples in another order
        data.update(loader=d.loader, format=d.format, train=resolve(d.train), wsp_train=resolve(d.wsp_train),
                    tags=resolve(d.tags), vocab=resolve(d.vocab), max_tags=d.max_tags)
    model = dataclasses.asdict(cfg.model)
    mae = {"seed": cfg.run.seed, "data": data, "model": model, "mae": dataclasses.asdict(cfg.mae)}
    wsp_cfg = {k: v for k, v in dataclasses.asdict(cfg.wsp).items() if k not in ("init", "compare_scratch")}
    wsp = {"seed": cfg.run.seed, "data": data, "model": model, "wsp": wsp_cfg}
    init = cfg.wsp.init if cfg.wsp.init in ("mae", "scratch") else str(Path(cfg.wsp.init).resolve())
    out = {
        "mae": mae,
        "wsp": {**wsp, "init": init, **({"mae": mae} if init == "mae" else {})},
        "wsp_scratch": {**wsp, "init": "scratch"},
    }
    f = cfg.finetune
    ft_cfg = {k: v for k, v in dataclasses.asdict(f).items() if k not in ("init", "compare")}
    ft_data = dict(data, eval_train=resolve(d.eval_train)) if d.loader != "reference" else data
    ft = {"seed": cfg.run.seed, "data": ft_data, "model": dataclasses.asdict(finetune_model_config(cfg)),
          "finetune": ft_cfg}
    for name, ft_init, _ in finetune_runs(cfg):
        src = out[ft_init] if ft_init in out else str(Path(ft_init).resolve())
        out[name] = {**ft, "init": ft_init if ft_init in out else src, **({"from": src} if ft_init in out else {})}
    return out


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


# --- fine-tuning -------------------------------------------------------------------------------
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


def _num_labels(cfg: Config, data: DemoData | None) -> int:
    if data is not None:
        return 10
    d = cfg.data
    n = open_source(eval_format(d.eval_train), d.eval_train, d.tags, d.vocab).num_classes
    if n == 0:
        raise ConfigError(f"config: data.eval_train: {d.eval_train} has no class labels to fine-tune on; use an image "
                          "folder or shards written from one (`maws-data shards --folder`)")
    return n


def build_finetune_model(cfg: Config, num_classes: int) -> torch.nn.Module:
    """The fine-tune classifier: learnable pos-embed, ``finetune.global_pool``, stochastic depth."""
    f = cfg.finetune
    return build_classifier(finetune_model_config(cfg), num_classes, global_pool=f.global_pool,
                            drop_path_rate=f.drop_path, pos_embed_learnable=True)


def finetune_stage(cfg: Config, data: DemoData | None, device: torch.device, name: str, init: str,
                   mesh: Mesh | None = None) -> Stage:
    """Fine-tune an encoder on the labelled data (Fashion-MNIST's train split, or data.eval_train)."""
    f = cfg.finetune
    rank, dp = _data_shard(mesh)
    mcfg = finetune_model_config(cfg)
    num_classes = _num_labels(cfg, data)
    rand_aug = None if f.rand_aug == "none" else f.rand_aug
    if data is not None:
        check_batch(f.batch_size, dp, cfg.parallel.grad_accum)
        extras = TrainAugment(mcfg.img_size, f.crop_scale, flip_p=f.flip_p, rand_aug=rand_aug, reprob=f.reprob)
        loader = BatchLoader(
            data.train_x, data.train_y, f.batch_size, cfg.run.seed, cfg.data.mean, cfg.data.std,
            augment={"out_size": mcfg.img_size, "scale": f.crop_scale, "flip_p": f.flip_p},
            num_workers=cfg.data.num_workers, shard=(rank, dp),
            extras=FinetuneAugment(extras, cfg.data.mean) if extras.has_extras else None,
        )
    else:
        d = cfg.data
        source = open_source(eval_format(d.eval_train), d.eval_train, d.tags, d.vocab)
        loader = jpeg_loader(dataclasses.replace(cfg, model=mcfg), source, f.batch_size, f.crop_scale, f.flip_p,
                             "label", device, shard=(rank, dp), log=say, rand_aug=rand_aug, reprob=f.reprob)
    torch.manual_seed(mix_seed(cfg.run.seed, Stream.FT_INIT))
    model = build_finetune_model(cfg, num_classes).to(device)

    def init_fn() -> str:
        path = init_path(cfg, init)
        if not path.exists():
            raise CheckpointError(f"finetune from {init!r} needs {path}, which does not exist; run that stage first "
                                  f"or point --finetune.init at a checkpoint")
        # The head is always new (another task's classes); the official re-initialises it too.
        sd = unwrap_state_dict(read_weights(path))
        old_head = [k for k in sd if k.startswith("head.")]
        report = load_pretrained(model, {k: v for k, v in sd.items() if k not in old_head}, source=str(path))
        fresh = {"head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"}  # new in a fine-tune, as the official
        missing = [k for k in report.initialised if k not in fresh]
        if missing:
            raise CheckpointError(f"{path} lacks encoder tensors {missing[:6]} ({len(missing)} in all); "
                                  "--finetune.init must point at an MAE or ViT checkpoint of this model config")
        with torch.no_grad():  # the official head init
            torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)
            torch.nn.init.zeros_(model.head.bias)
        replaced = f"; its head ({tuple(sd['head.weight'].shape)[0]} outputs) replaced" if "head.weight" in sd else ""
        return f"encoder initialised from {path}: {report.summary()}{replaced}; new head trunc-normal std 2e-5"

    mixup = Mixup(num_classes, mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, prob=f.mixup_prob,
                  switch_prob=f.mixup_switch_prob, label_smoothing=f.smoothing)
    objective = FinetuneObjective(model, mixup, cfg.run.seed, rank)
    return Stage(name, objective, loader, f, flops_per_image(mcfg, "wsp", num_classes), _fingerprints(cfg)[name],
                 init_fn, param_groups=lambda m: layer_decay_groups(m, f.weight_decay, f.layer_decay))


def finetune_eval(cfg: Config, data: DemoData | None, device: torch.device, name: str) -> dict:
    """Top-1 / top-5 of a finished fine-tune on the held-out split (Fashion-MNIST's test split, or
    data.eval_val through the eval transform: resize to size / crop_frac, centre crop; crop
    fraction 1 above 224 px, as the official). Written to ``<out>/<name>/eval.json``."""
    final = Path(cfg.run.out_dir) / name / "final"
    tensors, meta, _ = load_checkpoint(final)
    check_fingerprint(meta.get("fingerprint", {}), _fingerprints(cfg)[name], final)
    num_classes = _num_labels(cfg, data)
    model = build_finetune_model(cfg, num_classes).to(device)
    load_pretrained(model, tensors, strict=True, source=str(final))
    model.eval()
    if data is not None:
        batches = BatchLoader(data.test_x, data.test_y, cfg.eval.batch_size, cfg.run.seed, cfg.data.mean,
                              cfg.data.std, drop_last=False, shuffle=False).epoch(0)
        close = lambda: None  # noqa: E731
    else:
        mcfg = finetune_model_config(cfg)
        ecfg = dataclasses.replace(cfg, model=mcfg, data=dataclasses.replace(
            cfg.data, eval_crop_frac=cfg.data.eval_crop_frac if mcfg.img_size <= 224 else 1.0))
        loader = jpeg_loader(ecfg, cfg.data.eval_val, cfg.eval.batch_size, None, 0.0, "label", device,
                             eval_transform=True, log=say)
        batches, close = loader.epoch(0), loader.close
    k = min(5, num_classes)
    hits1 = hits5 = n = 0
    try:
        with torch.inference_mode():
            for x, y in batches:
                y = y.to(device)
                top = model(x.to(device, non_blocking=True)).float().topk(k, dim=1).indices  # (B, k)
                hits1 += int((top[:, 0] == y).sum())
                hits5 += int((top == y[:, None]).any(1).sum())
                n += y.shape[0]
    finally:
        close()
    row = {"top1": hits1 / n, "top5": hits5 / n, "num_test": n, "step": meta["step"]}
    atomic_write_text(Path(cfg.run.out_dir) / name / "eval.json", json.dumps(row, indent=2))
    return row


def _check_finetune_inits(cfg: Config) -> None:
    """Before any training: every encoder a fine-tune starts from is there, or is trained first."""
    made = {"mae": "mae" in cfg.run.stages, "wsp": "wsp" in cfg.run.stages,
            "wsp_scratch": "wsp" in cfg.run.stages and cfg.wsp.compare_scratch and cfg.wsp.init != "scratch"}
    for name, init, _ in finetune_runs(cfg):
        key = "finetune.init" if name == "finetune" else "finetune.compare"
        if init in made:
            if not made[init] and not init_path(cfg, init).exists():
                raise ConfigError(f"config: {key}: {init} is not trained by this run (run.stages={cfg.run.stages}) and "
                                  f"{init_path(cfg, init)} does not exist; add its stage or use a checkpoint path")
        else:
            check_init(key, init, ())


# --- evaluation --------------------------------------------------------------------------------
def _probe_checkpoint(cfg: Config, feats, num_classes: int, device: torch.device, echo: Echo) -> dict:
    """``eval.init``: the probes of any checkpoint (ours, the official MAE's, MAWS's, timm's) on
    ``cfg.model``'s architecture; a checkpoint with ``fc_norm`` and no ``norm`` is pooled as it was
    trained (patch-token mean + fc_norm), any other by its cls token after ``norm``."""
    path = Path(cfg.eval.init)
    sd = unwrap_state_dict(read_weights(path))
    pool = "avg" if "fc_norm.weight" in sd and "norm.weight" not in sd else "token"
    # learnable: a trained table (MAWS, timm, fine-tunes) is kept, resampled if the grid differs
    model = build_classifier(cfg.model, num_classes=0, global_pool=pool, pos_embed_learnable=True).to(device)
    report = load_pretrained(model, {k: v for k, v in sd.items() if not k.startswith("head.")}, source=str(path))
    if report.initialised:
        raise CheckpointError(f"{path} lacks encoder tensors {report.initialised[:4]} of this model config; set "
                              "--model.preset (and img_size / patch_size) to the checkpoint's architecture")
    echo(f"[linprobe] {path}: {report.summary()} ({pool} pooling)")
    return {"model": str(path), "stage": "eval.init", "train_steps": "-",
            **probe_encoder(cfg, model, feats, num_classes)}


def evaluate(cfg: Config, data: DemoData | None, device: torch.device, echo: Echo) -> list[dict]:
    """Linear probe and k-shot on frozen cls features of every finished encoder of this run (or of
    the one checkpoint ``eval.init`` names)."""
    out = Path(cfg.run.out_dir)
    candidates = [(name, label) for name, _, label in wsp_runs(cfg)] + [("mae", "MAE only (no WSP)")]
    fingerprints = _fingerprints(cfg)
    feats, num_classes = feature_sets(cfg, data, device, log=say)
    if cfg.eval.init is not None:
        row = _probe_checkpoint(cfg, feats, num_classes, device, echo)
        echo(f"[linprobe] {row['model']}: linear probe {100 * row['linear_probe_top1']:.2f}%"
             + "".join(f", {k}-shot {100 * row[f'{k}shot_top1_mean']:.2f}%" for k in cfg.eval.shots))
        return [row]
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
    _attach_finetunes(cfg, rows)
    return rows


def _attach_finetunes(cfg: Config, rows: list[dict]) -> None:
    """Each finished fine-tune's top-1 / top-5 next to the probe numbers of the encoder it started
    from; a fine-tune of an outside checkpoint gets a row of its own."""
    if "finetune" not in cfg.run.stages:
        return
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
        if cfg.eval.init is not None:
            check_init("eval.init", cfg.eval.init, ())
    if "wsp" in cfg.run.stages:
        check_init("wsp.init", cfg.wsp.init, ("mae",))
    if "finetune" in cfg.run.stages:
        _check_finetune_inits(cfg)
        f = cfg.finetune
        if f.rand_aug != "none":
            try:
                parse_rand_policy(f.rand_aug)
            except ConfigError as e:
                raise ConfigError(f"config: finetune.rand_aug: {e}") from None
        if data is None and cfg.data.loader == "dali" and (f.rand_aug != "none" or f.reprob > 0):
            raise ConfigError("config: finetune.rand_aug / finetune.reprob: RandAugment and random erasing run in the "
                              "PIL loader; the DALI pipeline does not have them yet. Use --data.loader=pil for the "
                              "fine-tune, or turn them off (--finetune.rand_aug=none --finetune.reprob=0)")
        if data is not None and finetune_model_config(cfg).img_size != 28:
            raise ConfigError("config: finetune.img_size: the Fashion-MNIST demo data are 28x28; leave it 0 "
                              "(fine-tuning at another resolution needs JPEG data, data.dataset=jpeg)")
        if data is None and (cfg.data.eval_train is None or cfg.data.eval_val is None):
            raise ConfigError("config: data.eval_train: finetune on data.dataset=jpeg needs labelled images: set "
                              "--data.eval_train=DIR (it trains on them) and --data.eval_val=DIR (top-1 on them)")
    summary: dict = {"stages": {}, "results": []}
    train = dict(parallel=cfg.parallel, mesh=mesh, echo=echo)
    if "mae" in cfg.run.stages:
        summary["stages"]["mae"] = str(run_stage(mae_stage(cfg, data, device, mesh), out, cfg.run, device, **train))
    if "wsp" in cfg.run.stages:
        for name, init, _ in wsp_runs(cfg):
            stage = wsp_stage(cfg, data, device, name, init, mesh)
            summary["stages"][name] = str(run_stage(stage, out, cfg.run, device, **train))
    if "finetune" in cfg.run.stages:
        for name, init, _ in finetune_runs(cfg):
            stage = finetune_stage(cfg, data, device, name, init, mesh)
            summary["stages"][name] = str(run_stage(stage, out, cfg.run, device, **train))
        if main:  # after every fine-tune has trained: the other ranks never wait on rank 0 mid-recipe
            for name, _, label in finetune_runs(cfg):
                row = finetune_eval(cfg, data, device, name)
                echo(f"[{name}] {label}: top-1 {100 * row['top1']:.2f}%, top-5 {100 * row['top5']:.2f}% "
                     f"on {row['num_test']} held-out images")
    if "linprobe" in cfg.run.stages and main:  # frozen-feature probes are small: rank 0 runs them alone
        rows = evaluate(cfg, data, device, echo)
        summary["results"] = rows
        atomic_write_text(out / "results.json", json.dumps(rows, indent=2))
        table = results_table(rows, cfg.eval.shots)
        atomic_write_text(out / "results.md", table + "\n")
        echo("\n" + table)
    return summary
