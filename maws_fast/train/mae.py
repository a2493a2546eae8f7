"""The MAE pre-pretraining stage: the masked autoencoder on the training images, normalised-pixel
loss on the masked patches (:class:`~maws_fast.train.objectives.MAEObjective`)."""
from __future__ import annotations

import torch

from maws_fast.config import Config
from maws_fast.data.demo import DemoData
from maws_fast.data.loader import check_batch, jpeg_loader
from maws_fast.data.reference import BatchLoader
from maws_fast.models import build_mae
from maws_fast.models.flops import flops_per_image
from maws_fast.parallel.mesh import Mesh
from maws_fast.seeds import Stream, mix_seed
from maws_fast.train.loop import Stage, say
from maws_fast.train.objectives import MAEObjective
from maws_fast.train.runs import ENCODER_LABELS, data_shard, fingerprints


def mae_runs(cfg: Config) -> list[tuple[str, str, str]]:
    """(stage name, init, table label) of the one MAE this config trains."""
    return [("mae", "scratch", ENCODER_LABELS["mae"])]


def mae_stage(cfg: Config, data: DemoData | None, device: torch.device, mesh: Mesh | None = None) -> Stage:
    """The MAE stage: ``data.train`` through a JPEG loader, or the demo's in-memory images."""
    torch.manual_seed(mix_seed(cfg.run.seed, Stream.MAE_INIT))  # model init: the same weights on every rank
    model = build_mae(cfg.model, norm_pix_loss=cfg.mae.norm_pix_loss).to(device)
    m = cfg.mae
    rank, dp = data_shard(mesh)
    if cfg.data.loader != "reference":
        loader = jpeg_loader(cfg, cfg.data.train, m.batch_size, m.augment.crop_scale, m.augment.flip_p, "none",
                             device, shard=(rank, dp), log=say)
    else:
        check_batch(m.batch_size, dp, cfg.parallel.grad_accum)
        loader = BatchLoader(
            data.train_x, None, m.batch_size, cfg.run.seed, cfg.data.mean, cfg.data.std,
            augment={"out_size": cfg.model.img_size, "scale": m.augment.crop_scale, "flip_p": m.augment.flip_p},
            num_workers=cfg.data.num_workers, shard=(rank, dp),
        )
    objective = MAEObjective(model, m.mask_ratio, cfg.run.seed, rank, dp)
    return Stage("mae", objective, loader, m, flops_per_image(cfg.model, "mae", mask_ratio=m.mask_ratio),
                 fingerprints(cfg)["mae"])
