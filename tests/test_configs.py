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
            "finetune_vit_h14_518", "finetune_vit_l16_512", "linprobe_vit_b16", "wsp_vit_b16", "wsp_vit_l16"} <= names


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
    if path.stem == "finetune_vit_l16_512":  # MAE FINETUNE.md's ViT-Large, at MAWS's 512 px
        assert finetune_model_config(cfg).img_size == 512 and cfg.finetune.drop_path == 0.2
        assert cfg.model.embed_dim == 1024 and cfg.model.depth == 24


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.stem)
def test_config_uses_no_renamed_key_and_its_old_form_reads_the_same(tmp_path, path):
    """The recipes are written with the new keys (no note when loaded); the same file under the
    keys renamed in this release (RENAMED) still gives the same config, one note per old key."""
    import yaml

    from maws_fast.config import RENAMED

    notes = []
    cfg = load_config(path, [], echo=notes.append)
    assert notes == []
    data, olds = yaml.safe_load(path.read_text()), []
    for old, new in RENAMED.items():
        *parents, leaf = new.split(".")
        node = data
        for p in parents:
            node = node.get(p) if isinstance(node, dict) else None
        if isinstance(node, dict) and leaf in node:
            section, old_leaf = old.split(".")
            data[section][old_leaf] = node.pop(leaf)
            olds.append(old)
    for section in list(data):  # nested sections left empty by the moves
        for k in [k for k, v in data[section].items() if v == {}]:
            del data[section][k]
    (tmp_path / "old.yaml").write_text(yaml.safe_dump(data))
    assert load_config(tmp_path / "old.yaml", [], echo=notes.append) == cfg
    assert len(notes) == len(olds)


def test_recipe_crops_are_the_official_ones():
    by_name = {p.stem: load_config(p, []) for p in CONFIGS}
    for name, cfg in by_name.items():
        if name.startswith("mae_"):
            assert (cfg.mae.augment.crop_scale, cfg.mae.augment.flip_p) == ((0.2, 1.0), 0.5), name
        if name.startswith("wsp_"):
            assert (cfg.wsp.augment.crop_scale, cfg.wsp.augment.flip_p) == ((0.08, 1.0), 0.5), name
        if name.startswith("finetune_"):
            assert (cfg.finetune.augment.crop_scale, cfg.finetune.augment.flip_p) == ((0.08, 1.0), 0.5), name


def test_fingerprints_keep_the_crop_and_flip_flat():
    """A stage's fingerprint records its crop and flip as it did before they moved into
    ``<stage>.augment``, so checkpoints made before still resume (and are refused when they change)."""
    from maws_fast.train.runs import fingerprints

    prints = fingerprints(load_config(None, ["--run.stages=[mae,wsp,finetune,lit,linprobe]"]))
    for stage, section in (("mae", "mae"), ("wsp", "wsp"), ("finetune", "finetune"), ("lit", "lit")):
        fp = prints[stage][section]
        assert "augment" not in fp and {"crop_scale", "flip_p"} <= set(fp), stage
    assert prints["lit"]["lit"]["crop_scale"] == (0.9, 1.0) and prints["lit"]["lit"]["flip_p"] == 0.0
    other = fingerprints(load_config(None, ["--mae.augment.crop_scale=[0.3,1.0]"]))
    assert other["mae"] != fingerprints(load_config(None, []))["mae"]
