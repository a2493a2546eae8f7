"""The training loop: exact resume, config-mismatch refusal, MAE -> WSP initialisation, metrics."""
import json
import re

import pytest
import torch

from maws_fast.config import load_config
from maws_fast.data import fmnist
from maws_fast.data.demo import DemoData
from maws_fast.errors import CheckpointError, UserError
from maws_fast.storage import list_checkpoints, load_checkpoint
from maws_fast.train.loop import Stage, run_stage
from maws_fast.train.mae import mae_stage
from maws_fast.train.wsp import wsp_stage

from conftest import needs_fmnist  # noqa: E402

pytestmark = needs_fmnist


@pytest.fixture(scope="module")
def data():
    x, y = fmnist.load_fmnist(None, "train")
    tx, ty = fmnist.load_fmnist(None, "test")
    wx, wt = fmnist.make_weak_hashtags(x[:2000], y[:2000], 384, seed=0)
    return DemoData(x[:512], y[:512], tx[:256], ty[:256], wx, wt)


def small_cfg(out, *extra):
    # 512 images / batch 64 = 8 steps per epoch; 1.5 epochs = 12 steps crossing an epoch boundary.
    return load_config(None, [
        f"--run.out_dir={out}", "--run.progress=false", "--run.ckpt_every=4", "--run.log_every=2",
        "--model.embed_dim=32", "--model.depth=2", "--model.num_heads=2",
        "--model.decoder_embed_dim=16", "--model.decoder_num_heads=2", "--model.decoder_depth=1",
        "--mae.batch_size=64", "--mae.epochs=1.5", "--mae.warmup_epochs=0.5", "--mae.blr=1e-3",
        "--wsp.batch_size=64", "--wsp.epochs=1.5", "--wsp.warmup_epochs=0.5", "--wsp.clip_grad=1.0", *extra,
    ])


def _weights(path):
    return load_checkpoint(path)[0]


@pytest.mark.parametrize("stop_at", [3, 5, 8])
def test_resume_matches_uninterrupted_mae(tmp_path, data, stop_at):
    dev = torch.device("cpu")
    cfg_a, cfg_b = small_cfg(tmp_path / "a"), small_cfg(tmp_path / "b")
    final_a = run_stage(mae_stage(cfg_a, data, dev), cfg_a.run.out_dir, cfg_a.run, dev, echo=lambda s: None)
    assert run_stage(mae_stage(cfg_b, data, dev), cfg_b.run.out_dir, cfg_b.run, dev, stop_at_step=stop_at,
                     echo=lambda s: None) is None
    assert list_checkpoints(tmp_path / "b" / "mae" / "ckpt")[-1].name == f"step_{stop_at:08d}"
    assert not (tmp_path / "b" / "mae" / "final").exists()
    # A new process would build a fresh model; the checkpoint must restore everything that matters.
    torch.manual_seed(1234)
    logs = []
    final_b = run_stage(mae_stage(cfg_b, data, dev), cfg_b.run.out_dir, cfg_b.run, dev, echo=logs.append)
    assert any("resuming from" in line and f"step {stop_at}/12" in line for line in logs)
    wa, wb = _weights(final_a), _weights(final_b)
    assert wa.keys() == wb.keys()
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    # the metric rows of the resumed run continue where the first left off
    steps = [r["step"] for r in map(json.loads, (tmp_path / "b" / "mae" / "metrics.jsonl").read_text().splitlines())]
    assert steps == sorted(steps) and steps[-1] == 12


def _damage(ckpt, how: str) -> None:
    f = ckpt / "rank_00000.safetensors"
    if how == "truncated shard":
        with open(f, "r+b") as fh:
            fh.truncate(f.stat().st_size - 100)
    elif how == "flipped bit":
        data = bytearray(f.read_bytes())
        data[-5] ^= 0x01
        f.write_bytes(bytes(data))
    elif how == "torn meta":
        (ckpt / "meta.json").write_text((ckpt / "meta.json").read_text()[:50])
    elif how == "empty dir":
        for p in ckpt.iterdir():
            p.unlink()


@pytest.mark.parametrize("how", ["truncated shard", "flipped bit", "torn meta", "empty dir"])
def test_a_damaged_newest_checkpoint_is_moved_aside_and_the_run_resumes_exactly(tmp_path, data, how):
    """The previous complete checkpoint takes over: the final weights equal an uninterrupted run's,
    the damaged one is kept under ckpt/damaged/ with what was wrong, and the log says so."""
    dev = torch.device("cpu")
    cfg_a, cfg_b = small_cfg(tmp_path / "a"), small_cfg(tmp_path / "b")
    final_a = run_stage(mae_stage(cfg_a, data, dev), cfg_a.run.out_dir, cfg_a.run, dev, echo=lambda s: None)
    run_stage(mae_stage(cfg_b, data, dev), cfg_b.run.out_dir, cfg_b.run, dev, stop_at_step=8, echo=lambda s: None)
    ckpt_dir = tmp_path / "b" / "mae" / "ckpt"
    assert [p.name for p in list_checkpoints(ckpt_dir)] == ["step_00000004", "step_00000008"]
    _damage(ckpt_dir / "step_00000008", how)
    logs = []
    final_b = run_stage(mae_stage(cfg_b, data, dev), cfg_b.run.out_dir, cfg_b.run, dev, echo=logs.append)
    warning = next(line for line in logs if "WARNING" in line)
    assert "step_00000008 is damaged" in warning and "falling back" in warning
    assert any("resuming from" in line and "step 4/12" in line for line in logs)
    wa, wb = _weights(final_a), _weights(final_b)
    for k in wa:
        assert torch.equal(wa[k], wb[k]), k
    aside = ckpt_dir / "damaged" / "step_00000008"
    assert aside.is_dir() and (aside / "DAMAGED.txt").read_text().strip() in warning
    assert sorted(p.name for p in ckpt_dir.iterdir()) == ["damaged"]  # the final save kept only the damaged one


def test_every_checkpoint_damaged_is_one_clear_error_and_nothing_is_deleted(tmp_path, data):
    dev = torch.device("cpu")
    cfg = small_cfg(tmp_path)
    run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, stop_at_step=8, echo=lambda s: None)
    ckpt_dir = tmp_path / "mae" / "ckpt"
    for c in list_checkpoints(ckpt_dir):
        _damage(c, "torn meta")
    with pytest.raises(CheckpointError, match=r"no complete checkpoint is left under .*run again to start the stage"):
        run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=lambda s: None)
    assert sorted(p.name for p in (ckpt_dir / "damaged").iterdir()) == ["step_00000004", "step_00000008"]


def test_torn_metric_rows_are_dropped_with_a_warning_on_resume(tmp_path, data):
    dev = torch.device("cpu")
    cfg = small_cfg(tmp_path)
    run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, stop_at_step=8, echo=lambda s: None)
    metrics = tmp_path / "mae" / "metrics.jsonl"
    lines = metrics.read_text().splitlines()
    metrics.write_text("\n".join(lines[:2] + ["[1, 2]", "\x00\x00garbage"] + lines[2:]) + "\n" + lines[-1][:17])
    logs = []
    run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=logs.append)
    assert any("WARNING: dropped 3 line(s)" in line and "not JSON rows" in line for line in logs)
    steps = [json.loads(line)["step"] for line in metrics.read_text().splitlines()]
    assert steps == [2, 4, 6, 8, 10, 12]


def test_resume_matches_uninterrupted_wsp_from_mae(tmp_path, data):
    dev = torch.device("cpu")
    cfgs = [small_cfg(tmp_path / n) for n in "ab"]
    for cfg in cfgs:
        run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=lambda s: None)
    final_a = run_stage(wsp_stage(cfgs[0], data, dev, "wsp", "mae"), cfgs[0].run.out_dir, cfgs[0].run, dev, echo=lambda s: None)
    run_stage(wsp_stage(cfgs[1], data, dev, "wsp", "mae"), cfgs[1].run.out_dir, cfgs[1].run, dev, stop_at_step=6, echo=lambda s: None)
    final_b = run_stage(wsp_stage(cfgs[1], data, dev, "wsp", "mae"), cfgs[1].run.out_dir, cfgs[1].run, dev, echo=lambda s: None)
    wa, wb = _weights(final_a), _weights(final_b)
    assert all(torch.equal(wa[k], wb[k]) for k in wa)
    assert "head.weight" in wa and "decoder_pred.weight" not in wa


def test_wsp_starts_from_the_mae_encoder(tmp_path, data):
    dev = torch.device("cpu")
    cfg = small_cfg(tmp_path)
    mae_final = run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=lambda s: None)
    stage = wsp_stage(cfg, data, dev, "wsp", "mae")
    msg = stage.init_fn()
    assert "dropped" in msg and "initialised 2 (head)" in msg
    mae_w = _weights(mae_final)
    for k, v in stage.model.state_dict().items():
        if not k.startswith("head"):
            assert torch.equal(v, mae_w[k]), k
    scratch = wsp_stage(cfg, data, dev, "wsp_scratch", "scratch")
    assert not torch.equal(scratch.model.blocks[0].attn.qkv.weight, mae_w["blocks.0.attn.qkv.weight"])


@pytest.mark.parametrize("mode", ["learned", "fixed"])
def test_wsp_trains_a_learned_pos_embed_from_the_mae_table_without_decay(tmp_path, data, mode):
    """SWAG / MAWS train a learned pos_embed in WSP: it starts as the MAE's sin-cos table, sits in the
    no-decay group, and moves; wsp.pos_embed=fixed keeps the table frozen (and out of the optimizer)."""
    from maws_fast.models.pos_embed import sincos_2d
    from maws_fast.train.optim import param_groups

    dev = torch.device("cpu")
    cfg = small_cfg(tmp_path, f"--wsp.pos_embed={mode}")
    mae_final = run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=lambda s: None)
    stage = wsp_stage(cfg, data, dev, "wsp", "mae")
    stage.init_fn()
    start = stage.model.pos_embed.detach().clone()
    g = stage.model.patch_embed.grid_size
    assert torch.equal(start, _weights(mae_final)["pos_embed"])
    torch.testing.assert_close(start[0], sincos_2d(cfg.model.embed_dim, g, g, cls_token=True).float())
    assert stage.model.pos_embed.requires_grad == (mode == "learned")
    groups = {g_["name"]: {id(p) for p in g_["params"]} for g_ in param_groups(stage.model, 0.1)}
    assert (id(stage.model.pos_embed) in groups["no_decay"]) == (mode == "learned")
    assert id(stage.model.pos_embed) not in groups["decay"]
    final = _weights(run_stage(stage, cfg.run.out_dir, cfg.run, dev, echo=lambda s: None))
    moved = (final["pos_embed"] - start).abs().max().item()
    assert (moved > 0) == (mode == "learned"), moved


def test_wsp_pos_embed_choice_is_validated_and_fingerprinted(tmp_path):
    from maws_fast.errors import ConfigError
    from maws_fast.train.runs import fingerprints

    with pytest.raises(ConfigError, match="wsp.pos_embed.*use learned or fixed"):
        small_cfg(tmp_path, "--wsp.pos_embed=sincos")
    a, b = (fingerprints(small_cfg(tmp_path, f"--wsp.pos_embed={m}")) for m in ("learned", "fixed"))
    assert a["wsp"] != b["wsp"] and a["mae"] == b["mae"]


@pytest.mark.parametrize("override, named", [
    ("--run.precision=bf16", "numerics.precision: 'fp32' -> 'bf16'"),
    ("--parallel.param_dtype=bf16", "numerics.param_dtype: 'fp32' -> 'bf16'"),
    ("--parallel.grad_accum=2", "numerics.grad_accum: 1 -> 2"),
    ("--model.attn_backend=manual", "model.attn_backend: 'sdpa' -> 'manual'"),
])
def test_settings_that_change_the_numbers_refuse_to_resume(tmp_path, data, override, named):
    dev = torch.device("cpu")
    cfg = small_cfg(tmp_path)
    run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, stop_at_step=4, echo=lambda s: None)
    changed = small_cfg(tmp_path, override)
    with pytest.raises(CheckpointError, match=re.escape(named)):
        run_stage(mae_stage(changed, data, dev), changed.run.out_dir, changed.run, dev, echo=lambda s: None)


@pytest.mark.parametrize("override", ["--run.log_every=3", "--run.ckpt_every=5", "--run.progress=true",
                                      "--run.activation_checkpoint=full", "--parallel.zero_stage=0"])
def test_settings_that_do_not_change_the_numbers_may_change_on_resume(tmp_path, data, override):
    dev = torch.device("cpu")
    cfg = small_cfg(tmp_path / "a")
    ref = _weights(run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=lambda s: None))
    cfg = small_cfg(tmp_path / "b")
    run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, stop_at_step=4, echo=lambda s: None)
    changed = small_cfg(tmp_path / "b", override)
    got = _weights(run_stage(mae_stage(changed, data, dev), changed.run.out_dir, changed.run, dev, echo=lambda s: None))
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_changed_config_refuses_to_resume_and_names_keys(tmp_path, data):
    dev = torch.device("cpu")
    cfg = small_cfg(tmp_path)
    run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, stop_at_step=4, echo=lambda s: None)
    changed = small_cfg(tmp_path, "--mae.mask_ratio=0.5")
    with pytest.raises(CheckpointError, match=r"different config \(mae\.mask_ratio: 0\.75 -> 0\.5\).*new --run\.out_dir"):
        run_stage(mae_stage(changed, data, dev), changed.run.out_dir, changed.run, dev, echo=lambda s: None)
    assert list_checkpoints(tmp_path / "mae" / "ckpt")  # nothing was lost
    run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=lambda s: None)
    logs = []
    run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=logs.append)
    assert "already finished" in logs[0]
    with pytest.raises(CheckpointError, match=r"model\.embed_dim: 32 -> 64"):
        wide = small_cfg(tmp_path, "--model.embed_dim=64")
        run_stage(mae_stage(wide, data, dev), wide.run.out_dir, wide.run, dev, echo=lambda s: None)


def test_wsp_init_path_with_wrong_shapes_names_keys(tmp_path, data):
    dev = torch.device("cpu")
    other = small_cfg(tmp_path / "other", "--model.embed_dim=48", "--model.num_heads=2")
    final = run_stage(mae_stage(other, data, dev), other.run.out_dir, other.run, dev, echo=lambda s: None)
    cfg = small_cfg(tmp_path / "run", f"--wsp.init={final / 'model.safetensors'}")
    stage = wsp_stage(cfg, data, dev, "wsp", cfg.wsp.init)
    with pytest.raises(CheckpointError, match=r"shape mismatch in \d+ key\(s\): cls_token: checkpoint \(1, 1, 48\) vs model \(1, 1, 32\)"):
        run_stage(stage, cfg.run.out_dir, cfg.run, dev, echo=lambda s: None)
    missing = wsp_stage(small_cfg(tmp_path / "run2"), data, dev, "wsp", "mae")
    with pytest.raises(CheckpointError, match=r"needs .*mae/final, which does not exist.*run the mae stage first"):
        run_stage(missing, tmp_path / "run2", small_cfg(tmp_path / "run2").run, dev, echo=lambda s: None)


def test_non_finite_loss_stops_with_advice_and_keeps_checkpoints(tmp_path, data):
    dev = torch.device("cpu")
    cfg = small_cfg(tmp_path)
    stage = mae_stage(cfg, data, dev)
    real = stage.objective.forward
    stage.objective.forward = lambda x, t, step, *a: real(x, t, step, *a) * (float("nan") if step >= 5 else 1.0)
    with pytest.raises(UserError, match=r"loss is nan at step 6; lower the learning rate"):
        run_stage(stage, cfg.run.out_dir, cfg.run, dev, echo=lambda s: None)
    assert [p.name for p in list_checkpoints(tmp_path / "mae" / "ckpt")] == ["step_00000004"]


def test_metrics_rows_have_throughput(tmp_path, data):
    dev = torch.device("cpu")
    cfg = small_cfg(tmp_path)
    run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=lambda s: None)
    rows = [json.loads(line) for line in (tmp_path / "mae" / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in rows] == [2, 4, 6, 8, 10, 12]
    assert all(r["images_per_s"] > 0 and r["tflops"] > 0 and r["loss"] > 0 for r in rows)
    assert rows[0]["lr"] < rows[2]["lr"]  # warming up over the first 4 steps
    # a CPU has no peak in the table and no allocator statistics: the columns are there, empty
    assert all(r["mfu"] is None and r["peak_mem_bytes"] is None for r in rows)
    # MAE does not clip; its log steps still measure the norm (clipping at infinity)
    assert all(r["grad_norm"] > 0 for r in rows)


def test_measuring_the_norm_of_an_unclipped_stage_changes_no_weight(tmp_path, data, monkeypatch):
    """Clipping at infinity on log steps scales by exactly 1: the final MAE weights equal those of
    a run that never computes the norm."""
    from maws_fast.train import loop

    dev = torch.device("cpu")
    cfg = small_cfg(tmp_path / "a")
    measured = _weights(run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=lambda s: None))
    clips = []
    monkeypatch.setattr(loop, "_clip_for", lambda clip, log_step: clips.append(log_step))  # returns None
    cfg = small_cfg(tmp_path / "b")
    plain = _weights(run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=lambda s: None))
    assert clips == [(s + 1) % 2 == 0 or s + 1 == 12 for s in range(12)]
    assert set(plain) == set(measured)
    for k in plain:
        assert torch.equal(plain[k], measured[k]), k


@pytest.mark.parametrize("mode", ["full", "selective"])
def test_activation_checkpointing_trains_to_the_same_weights(tmp_path, data, mode):
    dev = torch.device("cpu")
    cfg = small_cfg(tmp_path / "none")
    ref = _weights(run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=lambda s: None))
    cfg = small_cfg(tmp_path / mode, f"--run.activation_checkpoint={mode}")
    stage = mae_stage(cfg, data, dev)
    got = _weights(run_stage(stage, cfg.run.out_dir, cfg.run, dev, echo=lambda s: None))
    assert {b.activation_checkpoint for b in stage.model.modules() if hasattr(b, "activation_checkpoint")} == {mode}
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_tensorboard_mirrors_the_metrics_rows(tmp_path, data):
    pytest.importorskip("tensorboard", reason="the [tensorboard] extra (installed by scripts/setup.sh --dev)")
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    dev = torch.device("cpu")
    cfg = small_cfg(tmp_path, "--run.tensorboard=true")
    run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=lambda s: None)
    rows = [json.loads(line) for line in (tmp_path / "mae" / "metrics.jsonl").read_text().splitlines()]
    acc = EventAccumulator(str(tmp_path / "mae" / "tb"))
    acc.Reload()
    for key in ("loss", "lr", "images_per_s", "grad_norm"):
        events = acc.Scalars(f"mae/{key}")
        assert [e.step for e in events] == [r["step"] for r in rows]
        assert [e.value for e in events] == pytest.approx([r[key] for r in rows], rel=1e-6)
    assert "mae/mfu" not in acc.Tags()["scalars"]  # None on a CPU: not a number, not written


def test_tensorboard_without_the_package_is_one_clear_error(tmp_path, data, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_tensorboard(name, *args, **kw):
        if name.startswith("torch.utils.tensorboard") or name.startswith("tensorboard"):
            raise ImportError("No module named 'tensorboard'")
        return real_import(name, *args, **kw)

    monkeypatch.setattr(builtins, "__import__", no_tensorboard)
    dev = torch.device("cpu")
    cfg = small_cfg(tmp_path, "--run.tensorboard=true")
    with pytest.raises(UserError, match=r"run.tensorboard=true needs the tensorboard package.*pip install tensorboard"):
        run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=lambda s: None)
    assert not (tmp_path / "mae" / "metrics.jsonl").exists() or not (tmp_path / "mae" / "metrics.jsonl").read_text()


def test_metrics_rows_carry_the_gradient_norm_when_the_stage_clips(tmp_path, data, monkeypatch):
    from maws_fast.train import loop

    dev = torch.device("cpu")
    cfg = small_cfg(tmp_path)  # wsp.clip_grad=1.0
    norms = []
    step_fn = loop.train_step

    def spy(*args, **kw):  # the norm each engine step returns
        loss, norm = step_fn(*args, **kw)
        norms.append(norm.item())
        return loss, norm

    monkeypatch.setattr(loop, "train_step", spy)
    run_stage(wsp_stage(cfg, data, dev, "wsp", "scratch"), cfg.run.out_dir, cfg.run, dev, echo=lambda s: None)
    rows = [json.loads(line) for line in (tmp_path / "wsp" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) >= 3 and len(norms) == rows[-1]["step"]  # one norm per step, the last step logged
    # each row: its own step's norm before clipping
    assert [r["grad_norm"] for r in rows] == [norms[r["step"] - 1] for r in rows]
    assert all(r["grad_norm"] > 0 for r in rows)


@pytest.mark.parametrize("name, precision, tf32, want", [
    ("NVIDIA H100 80GB HBM3", "bf16", True, ("H100 SXM bf16", 989.4)),
    ("NVIDIA H100 PCIe", "fp32", True, ("H100 PCIe tf32", 378.0)),
    ("NVIDIA H200", "fp32", False, ("H200 fp32", 67.0)),
    ("NVIDIA A100-SXM4-80GB", "bf16", False, ("A100 bf16", 312.0)),
    ("NVIDIA GeForce RTX 4090", "bf16", True, None),
])
def test_mfu_peak_by_device_and_matmul_precision(monkeypatch, name, precision, tf32, want):
    from maws_fast.train.metrics import peak_tflops

    monkeypatch.setattr(torch.cuda, "get_device_name", lambda device=None: name)
    assert peak_tflops(torch.device("cuda", 0), precision, tf32) == want
    assert peak_tflops(torch.device("cpu"), precision, tf32) is None


def test_custom_stage_runs_through_the_loop(tmp_path):
    """The loop is stage-agnostic: any model + loader + loss works (what later engines plug into)."""
    from maws_fast.config import OptimConfig
    from maws_fast.data.reference import BatchLoader

    model = torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(16, 2))
    x = torch.randint(0, 255, (32, 4, 4), dtype=torch.uint8)
    y = torch.randint(0, 2, (32,))
    loader = BatchLoader(x, y, 8, 0, [0.5], [0.5])
    class Toy(torch.nn.Module):  # an objective: the network as .model, the loss as forward
        def __init__(self):
            super().__init__()
            self.model = model

        def forward(self, imgs, targets, step, micro=0, accum=1):
            return torch.nn.functional.cross_entropy(self.model(imgs), targets)

    stage = Stage("toy", Toy(), loader, OptimConfig(epochs=2, batch_size=8, lr=0.1, warmup_epochs=0), 64.0, {"toy": 1})
    run = load_config(None, ["--run.progress=false"]).run
    final = run_stage(stage, tmp_path, run, torch.device("cpu"), echo=lambda s: None)
    assert load_checkpoint(final)[1]["step"] == 8


def test_non_finite_loss_between_log_steps_is_never_checkpointed(tmp_path, data):
    """ckpt_every not a multiple of log_every: the NaN must be caught before the save, not after."""
    dev = torch.device("cpu")
    cfg = small_cfg(tmp_path, "--run.log_every=5", "--run.ckpt_every=3")
    stage = mae_stage(cfg, data, dev)
    real = stage.objective.forward
    stage.objective.forward = lambda x, t, step, *a: real(x, t, step, *a) * (float("inf") if step == 5 else 1.0)
    with pytest.raises(UserError, match=r"non-finite by step 6"):
        run_stage(stage, cfg.run.out_dir, cfg.run, dev, echo=lambda s: None)
    ckpts = list_checkpoints(tmp_path / "mae" / "ckpt")
    assert [p.name for p in ckpts] == ["step_00000003"]
    from maws_fast.parallel.checkpoint import consolidate

    assert all(torch.isfinite(v).all() for v in consolidate(ckpts[0]).values())


def test_wsp_init_file_that_fits_nothing_is_refused(tmp_path, data):
    from safetensors.torch import save_file

    foreign = tmp_path / "foreign.safetensors"
    save_file({"fc.weight": torch.randn(3, 3)}, str(foreign))
    cfg = small_cfg(tmp_path / "run", f"--wsp.init={foreign}")
    stage = wsp_stage(cfg, data, torch.device("cpu"), "wsp", cfg.wsp.init)
    with pytest.raises(CheckpointError, match=r"lacks encoder tensors \['cls_token', 'pos_embed'"):
        stage.init_fn()


def test_metrics_logged_after_the_last_checkpoint_are_not_duplicated_on_resume(tmp_path, data):
    """A crash between a checkpoint and the next one: the steps after the checkpoint run again,
    and their metric rows must appear once, not twice."""
    dev = torch.device("cpu")
    cfg = small_cfg(tmp_path)  # ckpt every 4, log every 2
    stage = mae_stage(cfg, data, dev)
    real = stage.objective.forward

    def crash_at_7(x, t, step, *a):
        if step == 6:
            raise KeyboardInterrupt  # the 7th step dies after step 6 was logged
        return real(x, t, step, *a)

    stage.objective.forward = crash_at_7
    with pytest.raises(KeyboardInterrupt):
        run_stage(stage, cfg.run.out_dir, cfg.run, dev, echo=lambda s: None)
    path = tmp_path / "mae" / "metrics.jsonl"
    assert [json.loads(r)["step"] for r in path.read_text().splitlines()] == [2, 4, 6]
    run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=lambda s: None)
    assert [json.loads(r)["step"] for r in path.read_text().splitlines()] == [2, 4, 6, 8, 10, 12]


def test_bf16_autocast_trains_close_to_fp32(tmp_path, data):
    dev = torch.device("cpu")
    losses = {}
    for prec in ("fp32", "bf16"):
        cfg = small_cfg(tmp_path / prec, f"--run.precision={prec}", "--mae.epochs=0.5")
        run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=lambda s: None)
        rows = [json.loads(r) for r in (tmp_path / prec / "mae" / "metrics.jsonl").read_text().splitlines()]
        losses[prec] = [r["loss"] for r in rows]
        weights = load_checkpoint(tmp_path / prec / "mae" / "final")[0]
        assert all(v.dtype == torch.float32 for v in weights.values())  # master weights stay fp32
    assert losses["fp32"] != losses["bf16"]  # autocast really ran in bf16
    for a, b in zip(losses["fp32"], losses["bf16"]):
        assert abs(a - b) < 0.05 * a


def test_wsp_loss_is_bitwise_the_unfused_head_and_loss():
    """The WSP stage fuses head and loss; on the torch path that is exactly CE(model(imgs))."""
    import maws_kernels
    from maws_fast.models import VisionTransformer
    from maws_fast.train.objectives import wsp_loss

    torch.manual_seed(0)
    model = VisionTransformer(img_size=28, patch_size=4, in_chans=1, embed_dim=32, depth=1, num_heads=2, num_classes=14)
    imgs, targets = torch.randn(8, 1, 28, 28), torch.softmax(torch.randn(8, 14), -1)
    fused = wsp_loss(model, imgs, targets)
    plain = maws_kernels.soft_target_cross_entropy(model(imgs), targets)
    assert torch.equal(fused, plain)
    params = [p for p in model.parameters() if p.requires_grad]
    g1 = torch.autograd.grad(fused, params, allow_unused=True)
    g2 = torch.autograd.grad(plain, params, allow_unused=True)
    assert all((a is None and b is None) or torch.equal(a, b) for a, b in zip(g1, g2))


def test_a_resumable_checkpoint_in_the_pre_sharded_format_is_one_clear_error(tmp_path, data):
    """step_*/model.safetensors + optim.safetensors (maws_fast before sharded checkpoints) no longer
    resumes: one CheckpointError names it and the fixes, and the checkpoint is left as it was."""
    from maws_fast.errors import CheckpointError
    from maws_fast.storage import atomic_write_text, save_checkpoint

    dev = torch.device("cpu")
    cfg = small_cfg(tmp_path)
    stage = mae_stage(cfg, data, dev)
    old = save_checkpoint(tmp_path / "mae" / "ckpt", "step_00000004", stage.model.state_dict(),
                          {"stage": "mae", "step": 4, "fingerprint": stage.fingerprint})
    atomic_write_text(old / "optim.safetensors", "")  # its presence is what marks the old format
    before = sorted(p.name for p in old.iterdir())
    with pytest.raises(CheckpointError, match=r"single-process format .* no longer resume.*"
                                              r"load as an init.*delete .*mae/ckpt"):
        run_stage(stage, cfg.run.out_dir, cfg.run, dev, echo=lambda s: None)
    assert sorted(p.name for p in old.iterdir()) == before and not (tmp_path / "mae" / "final").exists()


@pytest.mark.gpu
def test_metrics_rows_on_a_gpu_carry_mfu_and_peak_memory(tmp_path, data):
    dev = torch.device("cuda")
    cfg = small_cfg(tmp_path, "--run.device=cuda")
    run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=lambda s: None)
    rows = [json.loads(line) for line in (tmp_path / "mae" / "metrics.jsonl").read_text().splitlines()]
    assert all(r["peak_mem_bytes"] > 0 for r in rows)
    from maws_fast.train.metrics import peak_tflops

    if peak_tflops(dev, "bf16", True) is not None:  # a GPU of the table (the lent H100 / H200)
        assert all(0 < r["mfu"] < 1 for r in rows)


@pytest.mark.parametrize("sig", ["SIGTERM", "SIGUSR1", "SIGINT"])
def test_a_signal_checkpoints_the_current_step_and_the_resume_is_exact(tmp_path, data, monkeypatch, sig):
    """The signal arrives during step 7 (not a checkpoint step): step 7 finishes, is checkpointed, the
    stage raises Preempted (exit 75 in the CLI) naming the checkpoint; the resumed run ends with the
    uninterrupted run's weights bit for bit."""
    import os
    import signal

    from maws_fast.train import loop
    from maws_fast.train.preempt import PREEMPTED_EXIT, Preempted

    dev = torch.device("cpu")
    cfg_a, cfg_b = small_cfg(tmp_path / "a"), small_cfg(tmp_path / "b")
    ref = _weights(run_stage(mae_stage(cfg_a, data, dev), cfg_a.run.out_dir, cfg_a.run, dev, echo=lambda s: None))
    real = loop.train_step

    def signalled(engine, imgs, targets, step, *args):
        if step == 6:  # the 7th step
            os.kill(os.getpid(), getattr(signal, sig))
        return real(engine, imgs, targets, step, *args)

    monkeypatch.setattr(loop, "train_step", signalled)
    with pytest.raises(Preempted, match=rf"stopped by {sig} after step 7/12; checkpoint .*step_00000007 written") as e:
        run_stage(mae_stage(cfg_b, data, dev), cfg_b.run.out_dir, cfg_b.run, dev, echo=lambda s: None)
    assert e.value.exit_code == PREEMPTED_EXIT == 75
    assert [p.name for p in list_checkpoints(tmp_path / "b" / "mae" / "ckpt")] == ["step_00000004", "step_00000007"]
    assert signal.getsignal(signal.SIGTERM) is signal.SIG_DFL  # handlers restored after the stage
    monkeypatch.setattr(loop, "train_step", real)
    got = _weights(run_stage(mae_stage(cfg_b, data, dev), cfg_b.run.out_dir, cfg_b.run, dev, echo=lambda s: None))
    for k in ref:
        assert torch.equal(got[k], ref[k]), k


def test_sigint_twice_interrupts_at_once(tmp_path, data, monkeypatch):
    import os
    import signal

    from maws_fast.train import loop

    dev = torch.device("cpu")
    cfg = small_cfg(tmp_path)
    real = loop.train_step

    def twice(engine, imgs, targets, step, *args):
        if step == 2:
            os.kill(os.getpid(), signal.SIGINT)
            os.kill(os.getpid(), signal.SIGINT)
        return real(engine, imgs, targets, step, *args)

    monkeypatch.setattr(loop, "train_step", twice)
    with pytest.raises(KeyboardInterrupt):
        run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=lambda s: None)
    assert [p.name for p in list_checkpoints(tmp_path / "mae" / "ckpt")] == []  # before the first checkpoint
    assert signal.getsignal(signal.SIGINT) is signal.default_int_handler


def test_a_signal_in_the_last_step_finishes_the_stage_then_stops(tmp_path, data, monkeypatch):
    """Too late to checkpoint a step: the stage's final is written, and the job stops before the next."""
    import os
    import signal

    from maws_fast.train import loop
    from maws_fast.train.preempt import Preempted

    dev = torch.device("cpu")
    cfg = small_cfg(tmp_path)
    real = loop.train_step

    def signalled(engine, imgs, targets, step, *args):
        if step == 11:  # the last of 12
            os.kill(os.getpid(), signal.SIGTERM)
        return real(engine, imgs, targets, step, *args)

    monkeypatch.setattr(loop, "train_step", signalled)
    with pytest.raises(Preempted, match=r"stopped by SIGTERM at the end of the stage .*final written"):
        run_stage(mae_stage(cfg, data, dev), cfg.run.out_dir, cfg.run, dev, echo=lambda s: None)
    assert (tmp_path / "mae" / "final" / "model.safetensors").exists()
