"""The fine-tune stage: starts from an encoder of the run or any checkpoint, the official recipe's
pieces wired in (layer decay groups, drop path, mixup, avg pool + fc_norm, the new head's init),
exact resume, top-1 / top-5 on the held-out split, and configs refused before any training."""
import json

import pytest
import torch

from maws_fast.config import load_config
from maws_fast.data import fmnist
from maws_fast.data.demo import DemoData
from maws_fast.errors import ConfigError
from maws_fast.storage import load_checkpoint
from maws_fast.train.loop import run_stage
from maws_fast.train.finetune import finetune_eval, finetune_stage
from maws_fast.train.mae import mae_stage
from maws_fast.train.recipe import run_recipe

from conftest import needs_fmnist  # noqa: E402

pytestmark = needs_fmnist


@pytest.fixture(scope="module")
def data():
    x, y = fmnist.load_fmnist(None, "train")
    tx, ty = fmnist.load_fmnist(None, "test")
    return DemoData(x[:512], y[:512], tx[:200], ty[:200], x[:0], torch.zeros(0, len(fmnist.VOCAB)))


def small_cfg(out, *extra):
    # 512 images / batch 64 = 8 steps per epoch; 1.5 epochs = 12 steps crossing an epoch boundary.
    return load_config(None, [
        f"--run.out_dir={out}", "--run.progress=false", "--run.ckpt_every=4", "--run.log_every=2",
        "--model.embed_dim=32", "--model.depth=2", "--model.num_heads=2",
        "--model.decoder_embed_dim=16", "--model.decoder_num_heads=2", "--model.decoder_depth=1",
        "--mae.batch_size=64", "--mae.epochs=0.5", "--mae.warmup_epochs=0.25",
        "--finetune.batch_size=64", "--finetune.epochs=1.5", "--finetune.warmup_epochs=0.5",
        "--finetune.init=mae", "--finetune.drop_path=0.2", *extra,
    ])


def _mae(cfg, data):
    dev = torch.device("cpu")
    return run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=lambda s: None)


def test_stage_wires_the_official_recipe(tmp_path, data):
    cfg = small_cfg(tmp_path)
    _mae(cfg, data)
    stage = finetune_stage(cfg, data, torch.device("cpu"), "finetune", "mae")
    m = stage.model
    assert m.global_pool == "avg" and m.fc_norm is not None and m.norm is None
    assert [b.drop_path1.p for b in m.blocks] == pytest.approx([0.0, 0.2])
    assert m.pos_embed.requires_grad  # learnable, initialised from the MAE's sin-cos table
    groups = stage.param_groups(m)
    assert {g["name"]: g["lr_scale"] for g in groups}["layer_0_decay"] == pytest.approx(0.75 ** 3)
    msg = stage.init_fn()
    assert "fc_norm" in msg and "new head trunc-normal std 2e-5" in msg
    assert m.head.weight.std().item() < 1e-4 and torch.equal(m.head.bias, torch.zeros(10))
    mae_w = load_checkpoint(tmp_path / "mae" / "final")[0]
    assert torch.equal(m.blocks[1].mlp.fc2.weight, mae_w["blocks.1.mlp.fc2.weight"])
    assert torch.equal(m.pos_embed, mae_w["pos_embed"])


@pytest.mark.parametrize("stop_at", [5, 9])
def test_resume_matches_uninterrupted(tmp_path, data, stop_at):
    dev = torch.device("cpu")
    finals = []
    for name, stop in (("a", None), ("b", stop_at)):
        cfg = small_cfg(tmp_path / name)
        _mae(cfg, data)
        if stop is not None:
            assert run_stage(finetune_stage(cfg, data, dev, "finetune", "mae"), cfg.run.out_dir, cfg.run, dev,
                             stop_at_step=stop, echo=lambda s: None) is None
            torch.manual_seed(4321)  # a new process: nothing may depend on the global RNG
        finals.append(run_stage(finetune_stage(cfg, data, dev, "finetune", "mae"), cfg.run.out_dir, cfg.run, dev,
                                echo=lambda s: None))
    wa, wb = (load_checkpoint(f)[0] for f in finals)
    assert wa.keys() == wb.keys() and "fc_norm.weight" in wa
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    start = load_checkpoint(tmp_path / "a" / "mae" / "final")[0]
    assert not torch.equal(wa["blocks.0.attn.qkv.weight"], start["blocks.0.attn.qkv.weight"])  # it trained


def test_eval_reports_top1_and_top5_on_the_test_split(tmp_path, data):
    cfg = small_cfg(tmp_path, "--finetune.epochs=0.5", "--finetune.warmup_epochs=0.25")
    _mae(cfg, data)
    dev = torch.device("cpu")
    run_stage(finetune_stage(cfg, data, dev, "finetune", "mae"), cfg.run.out_dir, cfg.run, dev, echo=lambda s: None)
    row = finetune_eval(cfg, data, dev, "finetune")
    assert row["num_test"] == 200 and 0 <= row["top1"] <= row["top5"] <= 1 and row["step"] == 4
    assert json.loads((tmp_path / "finetune" / "eval.json").read_text()) == row


def test_recipe_refuses_bad_inits_before_training(tmp_path, data):
    base = ["--run.stages=[finetune]"]
    with pytest.raises(ConfigError, match="finetune.init: wsp is not trained by this run"):
        run_recipe(small_cfg(tmp_path / "r1", *base, "--finetune.init=wsp"), echo=lambda s: None)
    with pytest.raises(ConfigError, match="finetune.init: .*nope.pth does not exist"):
        run_recipe(small_cfg(tmp_path / "r2", *base, f"--finetune.init={tmp_path / 'nope.pth'}"), echo=lambda s: None)
    with pytest.raises(ConfigError, match="finetune.img_size: the Fashion-MNIST demo data are 28x28"):
        run_recipe(small_cfg(tmp_path / "r3", "--run.stages=[mae,finetune]", "--finetune.img_size=32"),
                   echo=lambda s: None)
    with pytest.raises(ConfigError, match="finetune.rand_aug: .*q9"):
        run_recipe(small_cfg(tmp_path / "r5", "--run.stages=[mae,finetune]", "--finetune.rand_aug=rand-q9"),
                   echo=lambda s: None)
    with pytest.raises(ConfigError, match="finetune.compare"):
        small_cfg(tmp_path / "r4", "--finetune.compare=[mae]")  # the init itself
    assert not (tmp_path / "r1" / "finetune").exists()
    assert not (tmp_path / "r3" / "mae").exists() and not (tmp_path / "r5" / "mae").exists()


def test_finetune_alone_from_an_official_mae_pth(tmp_path, data):
    import argparse

    cfg = small_cfg(tmp_path / "src")
    sd = load_checkpoint(_mae(cfg, data))[0]
    pth = tmp_path / "mae_pretrain.pth"
    torch.save({"model": sd, "epoch": 1, "args": argparse.Namespace(model="mae")}, pth)
    logs = []
    run = small_cfg(tmp_path / "run", "--run.stages=[finetune]", f"--finetune.init={pth}", "--finetune.epochs=0.25",
                    "--finetune.warmup_epochs=0.1")
    run_recipe(run, echo=logs.append)
    assert any(f"encoder initialised from {pth}" in line for line in logs)
    assert any("MAE" not in line and "-> FT: top-1" in line for line in logs)
    assert (tmp_path / "run" / "finetune" / "eval.json").exists()


def test_a_checkpoint_that_fits_no_encoder_is_refused(tmp_path, data):
    from safetensors.torch import save_file

    from maws_fast.errors import CheckpointError

    foreign = tmp_path / "foreign.safetensors"
    save_file({"fc.weight": torch.randn(3, 3)}, str(foreign))
    cfg = small_cfg(tmp_path / "run", f"--finetune.init={foreign}")
    stage = finetune_stage(cfg, data, torch.device("cpu"), "finetune", str(foreign))
    with pytest.raises(CheckpointError, match=r"lacks encoder tensors \['cls_token', 'pos_embed'.*--finetune.init"):
        stage.init_fn()
