"""Autotuned kernel choices travel with the checkpoint: every rank's picks are saved in its rank_meta, a
resumed process restores them before its first step (a fresh process would time the candidates again and
may pick a tile that rounds differently), and choices it cannot restore are named in one warning.

On the CPU the interpreter has one config per kernel and never fills the autotuners' caches, so the picks a
GPU process would have made are planted; the GPU test resumes a real autotuned run bit for bit."""
import json

import pytest
import torch

from maws_fast.config import load_config
from maws_fast.data import fmnist
from maws_fast.data.demo import DemoData
from maws_fast.storage import list_checkpoints, load_checkpoint, read_meta
from maws_fast.train.loop import run_stage
from maws_fast.train.mae import mae_stage

from conftest import needs_fmnist  # noqa: E402

pytest.importorskip("triton")
from maws_kernels import tuning  # noqa: E402

pytestmark = needs_fmnist


@pytest.fixture(scope="module")
def data():
    x, y = fmnist.load_fmnist(None, "train")
    tx, ty = fmnist.load_fmnist(None, "test")
    return DemoData(x[:256], y[:256], tx[:64], ty[:64], x[:64], torch.zeros(64, 14))


@pytest.fixture
def fresh():
    tuning.clear()
    yield tuning.autotuners()
    tuning.clear()


def _cfg(out, *extra):
    # 256 images / batch 32 = 8 steps, checkpoints at 4 and 8
    return load_config(None, [
        f"--run.out_dir={out}", "--run.progress=false", "--run.ckpt_every=4", "--run.log_every=4",
        "--model.embed_dim=32", "--model.depth=1", "--model.num_heads=2", "--model.decoder_embed_dim=16",
        "--model.decoder_num_heads=2", "--model.decoder_depth=1", "--mae.batch_size=32", "--mae.epochs=1",
        "--mae.warmup_epochs=0.25", *extra])


def _plant(fresh) -> dict:
    """Picks as a GPU process would have made them, one per attention kernel."""
    for i, t in enumerate(fresh.values()):
        t.cache[(197 + i, 32, False, "torch.bfloat16")] = t.configs[-1]
    return tuning.choices()


def test_the_checkpoint_carries_the_picks_and_a_resume_restores_them(tmp_path, data, fresh):
    dev = torch.device("cpu")
    cfg = _cfg(tmp_path)
    planted = _plant(fresh)
    assert run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, stop_at_step=4,
                     echo=lambda s: None) is None
    ckpt = list_checkpoints(tmp_path / "mae" / "ckpt")[-1]
    assert read_meta(ckpt)["rank_meta"][0]["kernel_tuning"] == json.loads(json.dumps(planted))
    tuning.clear()  # as a fresh process
    logs = []
    run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=logs.append)
    assert any("resuming from" in s for s in logs) and not any("autotuned" in s for s in logs)
    assert tuning.choices() == planted


def test_a_pick_that_cannot_be_restored_is_one_warning(tmp_path, data, fresh):
    dev = torch.device("cpu")
    cfg = _cfg(tmp_path)
    _plant(fresh)
    run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, stop_at_step=4, echo=lambda s: None)
    ckpt = list_checkpoints(tmp_path / "mae" / "ckpt")[-1]
    meta = json.loads((ckpt / "meta.json").read_text())
    picks = meta["rank_meta"][0]["kernel_tuning"]["kernels"]["attention._attn_fwd_kernel"]["picks"]
    picks[0][1]["num_warps"] = 3  # a config this kernel does not have (an upgrade dropped it)
    (ckpt / "meta.json").write_text(json.dumps(meta))
    tuning.clear()
    logs = []
    run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=logs.append)
    warn = [s for s in logs if "autotuned" in s]
    assert len(warn) == 1 and "could not be restored" in warn[0] and "num_warps': 3" in warn[0], logs
    assert "attention._attn_fwd_kernel" not in tuning.choices()["kernels"]  # that key would be tuned again


@pytest.mark.gpu
def test_a_resumed_gpu_run_reuses_the_picks_and_matches_bit_for_bit(tmp_path, data, fresh, monkeypatch):
    """Triton attention on the GPU (several configs, really autotuned): the run stopped at step 4 and resumed
    in a 'fresh process' (autotuners cleared) restores the saved picks and ends with the uninterrupted run's
    weights, bit for bit. Both halves launch run A's picks, so the comparison does not hang on two sets of
    noisy timings agreeing."""
    dev = torch.device("cuda")
    extra = ("--run.device=cuda", "--model.attn_backend=triton")
    cfg_a, cfg_b = _cfg(tmp_path / "a", *extra), _cfg(tmp_path / "b", *extra)
    final_a = run_stage(mae_stage(cfg_a, data, dev), cfg_a.run.out_dir, cfg_a.run, dev, echo=lambda s: None)
    picked = tuning.choices()
    assert picked["kernels"], "the GPU run autotuned nothing: is the attention backend triton?"
    tuning.clear()
    assert tuning.restore(picked) == []  # run B's first half launches what run A launched
    run_stage(mae_stage(cfg_b, data, dev), cfg_b.run.out_dir, cfg_b.run, dev, stop_at_step=4, echo=lambda s: None)
    ckpt = list_checkpoints(tmp_path / "b" / "mae" / "ckpt")[-1]
    saved = read_meta(ckpt)["rank_meta"][0]["kernel_tuning"]
    assert saved["kernels"] == picked["kernels"]
    tuning.clear()  # the resumed process starts with nothing tuned
    restored = []
    real = tuning.restore
    monkeypatch.setattr(tuning, "restore", lambda s: (restored.append(s), real(s))[1])  # what the resume put back
    final_b = run_stage(mae_stage(cfg_b, data, dev), cfg_b.run.out_dir, cfg_b.run, dev, echo=lambda s: None)
    assert restored and restored[0]["kernels"] == picked["kernels"]
    assert tuning.choices()["kernels"] == picked["kernels"]  # and nothing was re-tuned over them
    wa, wb = load_checkpoint(final_a)[0], load_checkpoint(final_b)[0]
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
