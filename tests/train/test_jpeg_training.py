"""Training from JPEG shards through the DALI (CPU operators) and PIL loaders.

The trainer checkpoints the reader state; a run stopped mid-epoch and resumed ends with the
same weights as an uninterrupted one, over an epoch boundary, for MAE and for WSP with hashtags.
"""
import json

import pytest
import torch

from maws_fast.config import load_config
from maws_fast.data import fmnist
from maws_fast.data.images import encode_jpeg
from maws_fast.data.shards import ShardWriter
from maws_fast.data.sources import Vocab
from maws_fast.errors import ConfigError
from maws_fast.storage import load_checkpoint, read_meta
from maws_fast.train.loop import run_stage
from maws_fast.train.mae import mae_stage
from maws_fast.train.recipe import run_recipe
from maws_fast.train.wsp import wsp_stage

from conftest import needs_fmnist  # noqa: E402

pytestmark = needs_fmnist


@pytest.fixture(scope="module")
def shards(tmp_path_factory):
    """A few hundred real Fashion-MNIST images and weak-hashtag mosaics as JPEG shards."""
    root = tmp_path_factory.mktemp("shards")
    x, y = fmnist.load_fmnist(None, "train")
    w = ShardWriter(root / "mae", 50)
    for i in range(150):
        w.write(f"{i:06d}", encode_jpeg(x[i].numpy(), 95), {"tags": [int(y[i])], "label": int(y[i])})
    w.finish()
    wx, wt = fmnist.make_weak_hashtags(x[:1000], y[:1000], 150, seed=0)
    Vocab(list(fmnist.VOCAB), wt.sum(0).long().tolist()).save(root / "vocab.json")
    w = ShardWriter(root / "wsp", 40)
    for i in range(150):
        w.write(f"{i:06d}", encode_jpeg(wx[i].numpy(), 95), {"tags": wt[i].nonzero().flatten().tolist()})
    (root / "wsp").mkdir(exist_ok=True)
    w.finish(vocab="../vocab.json")
    tx, ty = fmnist.load_fmnist(None, "test")
    for split, lo in (("eval_train", 0), ("eval_val", 200)):  # labelled image folders, ImageNet layout
        for i in range(lo, lo + 120):
            d = root / split / f"{int(ty[i]):02d}_{fmnist.CLASS_TAGS[int(ty[i])]}"
            d.mkdir(parents=True, exist_ok=True)
            (d / f"{i:05d}.jpg").write_bytes(encode_jpeg(tx[i].numpy(), 95))
    return root


def cfg_for(out, shards, loader, *extra):
    # 150 images / batch 32 = 5 steps per epoch (last one padded); 1.6 epochs = 8 steps.
    return load_config(None, [
        f"--run.out_dir={out}", "--run.progress=false", "--run.ckpt_every=3", "--run.log_every=2",
        f"--data.loader={loader}", f"--data.train={shards / 'mae'}", f"--data.wsp_train={shards / 'wsp'}",
        "--data.dali.threads=1", "--data.dali.shuffle_buffer=64",
        "--model.embed_dim=32", "--model.depth=1", "--model.num_heads=2",
        "--model.decoder_embed_dim=16", "--model.decoder_num_heads=2", "--model.decoder_depth=1",
        "--mae.batch_size=32", "--mae.epochs=1.6", "--mae.warmup_epochs=0.5", "--mae.blr=1e-3",
        "--wsp.batch_size=32", "--wsp.epochs=1.6", "--wsp.warmup_epochs=0.5", "--wsp.init=scratch", *extra,
    ])


@pytest.mark.parametrize("loader", ["dali", "pil"])
@pytest.mark.parametrize("stage_fn", ["mae", "wsp"])
def test_resume_from_shards_matches_uninterrupted(tmp_path, shards, loader, stage_fn):
    if loader == "dali":
        pytest.importorskip("nvidia.dali")
    dev = torch.device("cpu")
    make = (lambda c: mae_stage(c, None, dev)) if stage_fn == "mae" else (lambda c: wsp_stage(c, None, dev, "wsp", "scratch"))
    a, b = cfg_for(tmp_path / "a", shards, loader), cfg_for(tmp_path / "b", shards, loader)
    final_a = run_stage(make(a), a.run.out_dir, a.run, dev, echo=lambda s: None)
    assert run_stage(make(b), b.run.out_dir, b.run, dev, stop_at_step=6, echo=lambda s: None) is None
    ckpt = tmp_path / "b" / stage_fn / "ckpt" / "step_00000006"
    state = read_meta(ckpt)["rank_meta"][0]["data_state"]  # one process: rank 0's loader position
    assert state["kind"] == loader and (state["epoch"], state["batch"]) == (1, 1)
    torch.manual_seed(99)  # a new process: nothing but the checkpoint carries over
    final_b = run_stage(make(b), b.run.out_dir, b.run, dev, echo=lambda s: None)
    wa, wb = load_checkpoint(final_a)[0], load_checkpoint(final_b)[0]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    rows = [json.loads(ln) for ln in (tmp_path / "b" / stage_fn / "metrics.jsonl").read_text().splitlines()]
    assert all(r.get("bad_samples") == 0 for r in rows)


def test_wsp_on_hashtag_shards_uses_their_vocabulary(tmp_path, shards):
    pytest.importorskip("nvidia.dali")
    c = cfg_for(tmp_path, shards, "dali")
    stage = wsp_stage(c, None, torch.device("cpu"), "wsp", "scratch")
    assert stage.model.head.weight.shape[0] == len(fmnist.VOCAB)
    imgs, (ids, weights) = next(iter(stage.loader.epoch(0)))
    assert imgs.shape == (32, 1, 28, 28) and ids.dtype == torch.int64
    assert torch.allclose(weights.sum(1), torch.ones(32))  # every mosaic keeps at least one tag
    loss = stage.objective(imgs, (ids, weights), 0)
    assert torch.isfinite(loss) and loss.item() > 0


def test_jpeg_loader_config_errors(tmp_path, shards):
    with pytest.raises(ConfigError, match="data.train"):
        load_config(None, ["--data.loader=dali"])
    c = cfg_for(tmp_path, shards, "pil", "--data.dataset=jpeg")
    with pytest.raises(ConfigError, match="data.eval_train.*labelled"):
        run_recipe(c, echo=lambda s: None)


def test_whole_recipe_on_jpeg_data_with_folder_evaluation(tmp_path, shards):
    """dataset=jpeg: MAE and WSP from shards, linear probe + k-shot on labelled image folders (DALI eval pipeline)."""
    pytest.importorskip("nvidia.dali")
    c = cfg_for(tmp_path / "run", shards, "dali", "--data.dataset=jpeg", f"--data.eval_train={shards / 'eval_train'}",
                f"--data.eval_val={shards / 'eval_val'}", "--run.stages=[mae,wsp,linprobe]", "--eval.probe_epochs=2",
                "--eval.shots=[1]",
                "--eval.fewshot_trials=2", "--eval.batch_size=50", "--wsp.compare_scratch=false", "--wsp.init=mae",
                "--mae.epochs=0.4", "--wsp.epochs=0.4", "--mae.warmup_epochs=0.2", "--wsp.warmup_epochs=0.2")
    summary = run_recipe(c, echo=lambda s: None)
    rows = summary["results"]
    assert [r["stage"] for r in rows] == ["wsp", "mae"]
    for r in rows:
        assert r["linear_probe_train"] == 120 and 0.0 <= r["linear_probe_top1"] <= 1.0
        assert "1shot_top1_mean" in r


def test_finetune_on_labelled_jpeg_folders_with_both_loaders(tmp_path, shards):
    """dataset=jpeg: MAE from shards, then the fine-tune on data.eval_train (PIL loader, RandAugment and
    erasing on) and its top-1 / top-5 on data.eval_val through the eval transform; then the same
    fine-tune from that MAE checkpoint with the DALI loader (its RandAugment and erasing on)."""
    args = ["--data.dataset=jpeg", f"--data.eval_train={shards / 'eval_train'}", f"--data.eval_val={shards / 'eval_val'}",
            "--run.stages=[mae,finetune]", "--finetune.init=mae", "--finetune.batch_size=24", "--finetune.epochs=0.4",
            "--finetune.warmup_epochs=0.2", "--eval.batch_size=50", "--mae.epochs=0.4", "--mae.warmup_epochs=0.2"]
    logs = []
    summary = run_recipe(cfg_for(tmp_path / "run", shards, "pil", *args), echo=logs.append)
    assert "finetune" in summary["stages"]
    row = json.loads((tmp_path / "run" / "finetune" / "eval.json").read_text())
    assert row["num_test"] == 120 and 0 <= row["top1"] <= row["top5"] <= 1 and row["step"] == 2
    assert any("MAE only (no WSP) -> FT: top-1" in line for line in logs)
    pytest.importorskip("nvidia.dali")
    dali_args = [a for a in args if not a.startswith(("--run.stages", "--finetune.init"))]
    # at 44 px from the 28-px MAE: the 7x7 pos-embed grid is resampled to 11x11, and the DALI
    # pipeline crops, augments and evaluates at 44
    dali = cfg_for(tmp_path / "dali", shards, "dali", *dali_args, "--run.stages=[finetune]",
                   f"--finetune.init={tmp_path / 'run' / 'mae' / 'final'}", "--finetune.img_size=44")
    assert dali.finetune.rand_aug != "none" and dali.finetune.reprob > 0
    logs = []
    run_recipe(dali, echo=logs.append)
    assert any("resampled bicubically: pos_embed" in line for line in logs), logs
    row = json.loads((tmp_path / "dali" / "finetune" / "eval.json").read_text())
    assert row["num_test"] == 120 and 0 <= row["top1"] <= row["top5"] <= 1 and row["step"] == 2
