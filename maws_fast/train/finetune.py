"""The fine-tune stage: the official MAE fine-tune recipe on the shared loop, and its held-out evaluation."""
from __future__ import annotations

import dataclasses
import json
from pathlib import Path
from typing import Callable

import torch

from maws_fast.config import Config
from maws_fast.data.batching import FinetuneAugment, TrainAugment
from maws_fast.data.demo import DemoData
from maws_fast.data.loader import check_batch, eval_format, jpeg_loader
from maws_fast.data.randaug import parse_rand_policy
from maws_fast.data.reference import BatchLoader
from maws_fast.data.sources import open_source
from maws_fast.errors import CheckpointError, ConfigError
from maws_fast.models import build_classifier, load_encoder, load_pretrained, unwrap_state_dict
from maws_fast.models.flops import flops_per_image
from maws_fast.parallel.mesh import Mesh
from maws_fast.seeds import Stream, mix_seed
from maws_fast.storage import atomic_write_text, load_checkpoint, read_weights
from maws_fast.train.checkpoint import check_fingerprint
from maws_fast.train.loop import Stage, say
from maws_fast.train.mixup import Mixup
from maws_fast.train.objectives import FinetuneObjective
from maws_fast.train.optim import layer_decay_groups
from maws_fast.train.runs import check_init, data_shard, finetune_model_config, finetune_runs, fingerprints, init_path


def _labelled_source(cfg: Config):
    """data.eval_train, the labelled images a JPEG fine-tune trains on (listed once per stage)."""
    d = cfg.data
    source = open_source(eval_format(d.eval_train), d.eval_train, d.tags, d.vocab)
    if source.num_classes == 0:
        raise ConfigError(f"config: data.eval_train: {d.eval_train} has no class labels to fine-tune on; use an image "
                          "folder or shards written from one (`maws-data shards --folder`)")
    return source


def build_finetune_model(cfg: Config, num_classes: int) -> torch.nn.Module:
    """The fine-tune classifier: learnable pos-embed, ``finetune.global_pool``, stochastic depth."""
    f = cfg.finetune
    return build_classifier(finetune_model_config(cfg), num_classes, global_pool=f.global_pool,
                            drop_path_rate=f.drop_path, pos_embed_learnable=True)


def finetune_stage(cfg: Config, data: DemoData | None, device: torch.device, name: str, init: str,
                   mesh: Mesh | None = None) -> Stage:
    """Fine-tune an encoder on the labelled data (Fashion-MNIST's train split, or data.eval_train)."""
    f, aug = cfg.finetune, cfg.finetune.augment
    rank, dp = data_shard(mesh)
    mcfg = finetune_model_config(cfg)
    rand_aug = None if f.rand_aug == "none" else f.rand_aug
    if data is not None:
        num_classes = 10  # Fashion-MNIST
        check_batch(f.batch_size, dp, cfg.parallel.grad_accum)
        extras = TrainAugment(mcfg.img_size, aug.crop_scale, flip_p=aug.flip_p, rand_aug=rand_aug, reprob=f.reprob)
        loader = BatchLoader(
            data.train_x, data.train_y, f.batch_size, cfg.run.seed, cfg.data.mean, cfg.data.std,
            augment={"out_size": mcfg.img_size, "scale": aug.crop_scale, "flip_p": aug.flip_p},
            num_workers=cfg.data.num_workers, shard=(rank, dp),
            extras=FinetuneAugment(extras, cfg.data.mean) if extras.has_extras else None,
        )
    else:
        source = _labelled_source(cfg)
        num_classes = source.num_classes
        loader = jpeg_loader(dataclasses.replace(cfg, model=mcfg), source, f.batch_size, aug.crop_scale, aug.flip_p,
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
        report = load_encoder(model, {k: v for k, v in sd.items() if k not in old_head}, str(path),
                              new=("head.weight", "head.bias", "fc_norm.weight", "fc_norm.bias"),  # as the official
                              hint="--finetune.init must point at an MAE or ViT checkpoint of this model config")
        with torch.no_grad():  # the official head init
            torch.nn.init.trunc_normal_(model.head.weight, std=2e-5)
            torch.nn.init.zeros_(model.head.bias)
        replaced = f"; its head ({tuple(sd['head.weight'].shape)[0]} outputs) replaced" if "head.weight" in sd else ""
        return f"encoder initialised from {path}: {report.summary()}{replaced}; new head trunc-normal std 2e-5"

    mixup = Mixup(num_classes, mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, prob=f.mixup_prob,
                  switch_prob=f.mixup_switch_prob, label_smoothing=f.smoothing)
    objective = FinetuneObjective(model, mixup, cfg.run.seed, rank)
    return Stage(name, objective, loader, f, flops_per_image(mcfg, "wsp", num_classes), fingerprints(cfg)[name],
                 init_fn, param_groups=lambda m: layer_decay_groups(m, f.weight_decay, f.layer_decay))


def finetune_eval(cfg: Config, data: DemoData | None, device: torch.device, name: str) -> dict:
    """Top-1 / top-5 of a finished fine-tune on the held-out split (Fashion-MNIST's test split, or
    data.eval_val through the eval transform: resize to size / crop_frac, centre crop; crop
    fraction 1 above 224 px, as the official). Written to ``<out>/<name>/eval.json``."""
    final = Path(cfg.run.out_dir) / name / "final"
    tensors, meta = load_checkpoint(final)
    check_fingerprint(meta.get("fingerprint", {}), fingerprints(cfg)[name], final)
    num_classes = int(tensors["head.weight"].shape[0])  # the classes it was trained on
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


def finetune_evals(cfg: Config, data: DemoData | None, device: torch.device, echo: Callable[[str], None]) -> None:
    """Rank 0, once every fine-tune has trained: each one's held-out top-1 / top-5 (its ``eval.json``), echoed."""
    for name, _, label in finetune_runs(cfg):
        row = finetune_eval(cfg, data, device, name)
        echo(f"[{name}] {label}: top-1 {100 * row['top1']:.2f}%, top-5 {100 * row['top5']:.2f}% "
             f"on {row['num_test']} held-out images")


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


def check_finetune_config(cfg: Config, data: DemoData | None) -> None:
    """Everything a fine-tune needs, checked before any stage of the run trains: its inits, its
    augmentation policy and loader, its resolution and its labelled data."""
    _check_finetune_inits(cfg)
    f = cfg.finetune
    if f.rand_aug != "none":
        try:
            parse_rand_policy(f.rand_aug)
        except ConfigError as e:
            raise ConfigError(f"config: finetune.rand_aug: {e}") from None
    if data is not None and finetune_model_config(cfg).img_size != 28:
        raise ConfigError("config: finetune.img_size: the Fashion-MNIST demo data are 28x28; leave it 0 "
                          "(fine-tuning at another resolution needs JPEG data, data.dataset=jpeg)")
    if data is None and (cfg.data.eval_train is None or cfg.data.eval_val is None):
        raise ConfigError("config: data.eval_train: finetune on data.dataset=jpeg needs labelled images: set "
                          "--data.eval_train=DIR (it trains on them) and --data.eval_val=DIR (top-1 on them)")
