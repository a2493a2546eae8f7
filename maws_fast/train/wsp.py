"""The weakly supervised pretraining stage: the ViT with a linear head over the hashtag vocabulary,
soft-target cross-entropy on each image's tags (:class:`~maws_fast.train.objectives.WSPObjective`),
initialised from the MAE (``wsp.init``) or from scratch (``wsp.compare_scratch``)."""
from __future__ import annotations

import torch

from maws_fast.config import Config
from maws_fast.data import fmnist
from maws_fast.data.demo import DemoData
from maws_fast.data.loader import check_batch, jpeg_loader
from maws_fast.data.reference import BatchLoader
from maws_fast.errors import CheckpointError
from maws_fast.models import build_classifier, load_encoder
from maws_fast.models.flops import flops_per_image
from maws_fast.parallel.mesh import Mesh
from maws_fast.seeds import Stream, mix_seed
from maws_fast.storage import read_weights
from maws_fast.train.loop import Stage, say
from maws_fast.train.objectives import WSPObjective
from maws_fast.train.runs import check_init, data_shard, fingerprints, init_path


def check_wsp_config(cfg: Config, data: DemoData | None) -> None:
    """Before any training: ``wsp.init`` names the MAE, ``scratch`` or an existing checkpoint."""
    check_init("wsp.init", cfg.wsp.init, ("mae",))


def wsp_stage(cfg: Config, data: DemoData | None, device: torch.device, name: str, init: str,
              mesh: Mesh | None = None) -> Stage:
    """WSP stage ``name`` (``wsp`` or ``wsp_scratch``) from ``init``: hashtag shards through a JPEG
    loader, or the demo's weak-hashtag mosaics in memory."""
    w = cfg.wsp
    rank, dp = data_shard(mesh)
    if cfg.data.loader != "reference":
        loader = jpeg_loader(cfg, cfg.data.wsp_train or cfg.data.train, w.batch_size, w.augment.crop_scale,
                             w.augment.flip_p, "tags", device, shard=(rank, dp), log=say)
        num_tags = loader.source.num_classes
    else:
        check_batch(w.batch_size, dp, cfg.parallel.grad_accum)
        loader = BatchLoader(
            data.wsp_x, fmnist.tag_targets(data.wsp_tags), w.batch_size, cfg.run.seed, cfg.data.mean, cfg.data.std,
            augment={"out_size": cfg.model.img_size, "scale": w.augment.crop_scale, "flip_p": w.augment.flip_p},
            num_workers=cfg.data.num_workers, shard=(rank, dp),
        )
        num_tags = len(fmnist.VOCAB)
    torch.manual_seed(mix_seed(cfg.run.seed, Stream.WSP_INIT))  # same head / encoder init for every WSP variant
    # SWAG / MAWS train a timm ViT's learned pos_embed in WSP; here it starts as the MAE's sin-cos table
    model = build_classifier(cfg.model, num_classes=num_tags, pos_embed_learnable=w.pos_embed == "learned").to(device)

    def init_fn() -> str | None:
        if init == "scratch":
            return "encoder initialised from scratch (random init)"
        path = init_path(cfg, init)
        if not path.exists():
            hint = ("run the mae stage first (--run.stages=[mae,wsp,linprobe]) or set --wsp.init=scratch"
                    if init == "mae" else "point --wsp.init at an MAE or ViT checkpoint")
            raise CheckpointError(f"wsp.init={init!r} needs {path}, which does not exist; {hint}")
        report = load_encoder(model, read_weights(path), str(path), new=("head.weight", "head.bias"),
                              hint="--wsp.init must point at an MAE or ViT checkpoint of this model config")
        return f"encoder initialised from {path}: {report.summary()}"

    fp = fingerprints(cfg)["wsp_scratch" if init == "scratch" else "wsp"]
    return Stage(name, WSPObjective(model), loader, w, flops_per_image(cfg.model, "wsp", num_tags), fp, init_fn)
