"""Every recipe config under configs/ loads, validates, and builds the models of its stages (on the
meta device: shapes without memory), at the resolution each stage trains at."""
from pathlib import Path

import pytest
import torch

from maws_fast.config import load_config, resolve_defaults
from maws_fast.models import build_classifier, build_mae

CONFIGS = sorted((Path(__file__).resolve().parents[1] / "configs").glob("*.yaml"))


def test_the_recipe_configs_are_there():
    names = {p.stem for p in CONFIGS}
    assert {"demo_fmnist", "mae_vit_b16", "mae_vit_l16", "mae_vit_h14", "finetune_vit_b16_224",
            "finetune_vit_h14_518", "linprobe_vit_b16", "wsp_vit_b16", "wsp_vit_l16"} <= names


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_loads_and_builds_its_models(path):
    from maws_fast.train.finetune import build_finetune_model
    from maws_fast.train.runs import finetune_model_config

    cfg = load_config(path, [])
    text = path.read_text()
    assert text.startswith("#") and ("Source:" in text or path.stem == "demo_fmnist")  # each cites its source
    resolved, _ = resolve_defaults(cfg, dp_world=8)
    assert resolved.parallel.zero_stage in (0, 1, 2, 3)
    with torch.device("meta"):
        if "mae" in cfg.run.stages:
            m = build_mae(cfg.model, norm_pix_loss=cfg.mae.norm_pix_loss)
            assert m.patch_embed.grid_size * cfg.model.patch_size == cfg.model.img_size
        if "wsp" in cfg.run.stages:
            build_classifier(cfg.model, num_classes=1000)
        if "finetune" in cfg.run.stages:
            ft = build_finetune_model(cfg, 1000)
            size = finetune_model_config(cfg).img_size
            assert ft.patch_embed.img_size == (size, size) and ft.pos_embed.requires_grad
            assert ft.global_pool == cfg.finetune.global_pool
    if "finetune" in cfg.run.stages:  # a config that would be refused before training is no recipe
        assert cfg.data.loader != "dali" or (cfg.finetune.rand_aug == "none" and cfg.finetune.reprob == 0)
    if path.stem == "finetune_vit_h14_518":
        assert finetune_model_config(cfg).img_size == 518 and cfg.finetune.layer_decay == 0.75
