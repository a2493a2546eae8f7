"""The step benchmark's counting rule, its official-equivalent baselines, and a CPU smoke run.

Counted bytes are deterministic functions of the code (fake tensors, no timing), so they are
checked exactly here; speed is never asserted.
"""
import argparse
import json

import pytest
import torch
import torch.nn.functional as F

from maws_fast.bench.baseline import OfficialMAE, OfficialViT, soft_target_cross_entropy
from maws_fast.bench.step import add_step_args, bench_step, count_variant
from maws_fast.bench.traffic import footprint, per_image
from maws_fast.config import model_preset
from maws_fast.models import build_classifier, build_mae
from maws_kernels import layer_norm


def test_footprint_reads_an_expanded_dim_once():
    t = torch.randn(1, 1, 64)
    assert footprint(t) == 256
    assert footprint(t.expand(8, 50, 64)) == 256
    assert footprint(torch.randn(3, 5)[:, 1:]) == 3 * 4 * 4


def test_elementwise_step_counts_every_read_and_write():
    # (x * 2).sum() per image (a 1000-float row): mul reads x and writes y (8000 B), sum reads y (4000 B),
    # backward: mul's grad reads the expanded scalar (per-step) and writes dx (4000 B). Nothing else.
    def build():
        def make(b):
            x = torch.randn(b, 1000, requires_grad=True)
            return lambda: (x * 2).sum()
        return make

    r = per_image(build, batch=4)
    assert r.bytes == 16000
    assert r.gemm_flops == 0 and r.saved_bytes == 0


def test_custom_op_counts_its_triton_launches():
    # layer_norm (triton) on (b, 64, 32) fp32: the forward launch reads x and writes y (2 x 32 x 4 B per row)
    # plus fp32 mean / rstd (8 B per row); the backward launch reads dy, x, mean, rstd and writes dx
    # (3 x 128 + 8 B per row); its partial sums and the reduction are per-step.
    w, b_ = torch.randn(32, requires_grad=True), torch.randn(32, requires_grad=True)

    def build():
        def make(b):
            x = torch.randn(b, 64, 32, requires_grad=True)
            return lambda: layer_norm(x, w, b_, backend="triton").sum()
        return make

    r = per_image(build, batch=4)
    ln = {k: v for k, v in r.bytes_by_op.items() if k.startswith("triton")}
    assert ln == {"triton maws_kernels.layer_norm_fwd:layer_norm_fwd_kernel": 64 * (256 + 8),
                  "triton maws_kernels.layer_norm_bwd:layer_norm_bwd_kernel": 64 * (384 + 8)}


def test_gemm_flops_are_counted_not_their_bytes():
    lin = torch.nn.Linear(64, 32, bias=False)

    def build():
        def make(b):
            x = torch.randn(b, 64)
            return lambda: lin(x).sum()
        return make

    r = per_image(build, batch=4)
    # forward x @ W^T and the weight gradient grad^T @ x, both linear in the batch; x needs no gradient
    assert r.gemm_flops == 2 * (2 * 64 * 32)
    assert "aten.mm" not in r.bytes_by_op and "aten.addmm" not in r.bytes_by_op


def test_official_mae_baseline_computes_our_loss(seeded):
    cfg = model_preset("tiny")
    ours = build_mae(cfg, norm_pix_loss=True)
    official = OfficialMAE(cfg)
    official.load_state_dict(ours.state_dict(), strict=True)
    imgs = torch.randn(3, cfg.in_chans, cfg.img_size, cfg.img_size)
    noise = torch.rand(3, cfg.num_patches)
    lo, po, mo = ours(imgs, noise=noise)
    lb, pb, mb = official(imgs, noise=noise)
    assert torch.equal(mo, mb)
    torch.testing.assert_close(pb, po, atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(lb, lo, atol=1e-6, rtol=1e-5)


def test_official_vit_baseline_computes_our_logits(seeded):
    cfg = model_preset("tiny")
    ours = build_classifier(cfg, 14)
    official = OfficialViT(cfg, 14)
    official.load_state_dict(ours.state_dict(), strict=True)
    imgs = torch.randn(2, cfg.in_chans, cfg.img_size, cfg.img_size)
    torch.testing.assert_close(official(imgs), ours(imgs), atol=1e-5, rtol=1e-5)
    t = torch.softmax(torch.randn(2, 14), -1)
    logits = torch.randn(2, 14)
    torch.testing.assert_close(soft_target_cross_entropy(logits, t), -(t * F.log_softmax(logits, -1)).sum(-1).mean())


def test_b16_mae_counts_near_the_documented_official_figure():
    # docs: the official MAE ViT-B/16 under bf16 autocast moves ~313 MB per training image
    row = count_variant("mae", "vit_b16", "official eager", 1000, batch=4)
    assert 290 < row["mem_mb_per_img"] < 340
    assert 55 < row["gemm_gflop_per_img"] < 60  # ~58.7 GFLOP per image with attention's ~2


def test_cli_smoke_run_writes_rows(tmp_path):
    p = argparse.ArgumentParser()
    add_step_args(p)
    out = tmp_path / "step.json"
    args = p.parse_args(["--cases", "mae:tiny", "--variants", "official eager,ours eager,ours compile", "--measure",
                         "yes", "--device", "cpu", "--steps", "1", "--warmup", "0", "--batch-size", "4",
                         "--count-batch", "2", "--checkpoint", "none,selective", "--out", str(out)])
    rows = bench_step(args)
    assert [(r["variant"], r["activation_checkpoint"]) for r in rows] == [
        ("official eager", "none"), ("ours eager", "none"), ("ours eager", "selective"),
        ("ours compile", "none"), ("ours compile", "selective")]
    for r in rows:
        assert r["img_s"] > 0 and r["mfu"] is None  # measured; no peak is known for a CPU
    for r in rows[:3]:
        assert r["mem_mb_per_img"] > 0 and r["pred_h100_img_s"] > 0
    assert all("mem_mb_per_img" not in r for r in rows[3:])  # inductor's kernels are measured, not counted
    assert rows[1]["mem_vs_official"] < 1
    assert rows[2]["saved_vs_none"] < 1 and rows[2]["gemm_flops_vs_none"] >= 1  # GFLOP rounding: tiny is tiny
    assert out.exists()


def _per_image(stage: str, mode: str, preset: str = "tiny", batch: int = 2):
    from maws_fast.bench.step import _count_build

    return per_image(_count_build(stage, preset, "ours eager", 10, mode), batch)


@pytest.mark.parametrize("stage", ["mae", "wsp"])
def test_live_bytes_equal_the_saved_tensor_hooks_without_checkpointing(stage):
    """Two ways to count what a forward keeps: the storages still alive after it, and what autograd's
    saved-tensor hooks see packed. Without checkpointing they agree (to the odd tensor autograd does
    not pack, e.g. the masks the MAE hands back), and under full checkpointing too (a checkpoint
    packs its inputs outside the block); the hooks miss what selective checkpointing caches."""
    for mode in ("none", "full"):
        r = _per_image(stage, mode, "vit_b16")
        assert r.live_bytes == pytest.approx(r.saved_bytes, rel=0.01), mode
    selective = _per_image(stage, "selective", "vit_b16")
    assert selective.saved_bytes < 0.5 * selective.live_bytes


@pytest.mark.parametrize("stage", ["mae", "wsp"])
def test_checkpointing_modes_keep_less_and_recompute_the_counted_gemms(stage):
    """Selective keeps about half of what no checkpointing keeps and reruns one GEMM per block (the
    attention projection, 2 N D^2 FLOPs); full keeps far less and reruns three (qkv, proj, fc1:
    16 N D^2 -- fc2 never, backward needs only its input)."""
    cfg = model_preset("tiny")
    r = {mode: _per_image(stage, mode) for mode in ("none", "selective", "full")}
    assert r["full"].live_bytes < 0.25 * r["none"].live_bytes
    assert r["full"].live_bytes < r["selective"].live_bytes < 0.6 * r["none"].live_bytes
    n = cfg.num_patches + 1 if stage == "wsp" else int(cfg.num_patches * 0.25) + 1
    per_block = [(n, cfg.embed_dim)] * cfg.depth
    if stage == "mae":
        per_block += [(cfg.num_patches + 1, cfg.decoder_embed_dim)] * cfg.decoder_depth
    assert r["selective"].gemm_flops - r["none"].gemm_flops == pytest.approx(sum(2 * t * d * d for t, d in per_block))
    assert r["full"].gemm_flops - r["none"].gemm_flops == pytest.approx(sum(16 * t * d * d for t, d in per_block))


@pytest.mark.parametrize("zero_stage", [0, 1, 2, 3])
def test_fit_model_state_is_what_the_engine_keeps(zero_stage):
    """At one rank the fit table's model state is exactly our engine's memory_report (bf16 weights)."""
    from maws_fast.bench.fit import state_bytes
    from maws_fast.parallel.engine import AdamWSpec, build_engine
    from maws_fast.parallel.mesh import ParallelDims, ParallelLayout, single_process
    from maws_fast.train.objectives import MAEObjective
    from maws_fast.train.optim import param_groups

    m = build_mae(model_preset("tiny"))
    n = sum(p.numel() for p in m.parameters() if p.requires_grad)
    e = build_engine(MAEObjective(m, 0.75, 0), single_process(),
                     ParallelLayout(ParallelDims(1), zero_stage=zero_stage, param_dtype="bf16"),
                     AdamWSpec.of(m, param_groups(m, 0.05)))
    e.zero_grad()
    e.backward(e.objective(torch.randn(2, 1, 28, 28), None, 0))
    e.step(1e-4, None)
    assert sum(e.memory_report().values()) == state_bytes(n, zero_stage, 1) == 16 * n
    # sharded over 8: ZeRO-1 the optimizer, ZeRO-2 the gradients too, ZeRO-3 everything
    assert state_bytes(n, zero_stage, 8) == {0: 16 * n, 1: 4 * n + 12 * n / 8, 2: 2 * n + 14 * n / 8,
                                            3: 16 * n / 8}[zero_stage]


def test_fit_rows_follow_their_formula():
    from maws_fast.bench import fit
    from maws_fast.bench.step import _model

    acts = {"none": 40e6, "selective": 21e6, "full": 4e6}
    rows = fit.fit_rows([("mae", "vit_b16", 224)], ["ours:2", "ours:3"], list(acts), {"vit_b16": 8}, 2,
                        lambda stage, preset, res: _model(stage, preset, "ours eager", 10),
                        lambda s, p, res, mode: acts[mode])
    assert len(rows) == 6 and all(r["computed"] for r in rows)
    n = rows[0]["params_m"] * 1e6
    for r in rows:
        assert r["max_batch_h200_141gb"] > r["max_batch_h100_80gb"] > 0
        free = fit.HEADROOM * 80e9 - r["state_gb_per_rank"] * 1e9
        # a checkpointed step also holds one block's recomputation: (none - mode) / 20 blocks (12 + 8)
        live = acts[r["activation_checkpoint"]]
        eff = live + (acts["none"] - live) / 20
        assert r["act_mb_per_img"] == pytest.approx(eff / 1e6, abs=0.01)
        assert abs(r["max_batch_h100_80gb"] - free / eff) <= 2
    z2 = [r for r in rows if r["engine"] == "ours:2"]
    assert [r["max_batch_h100_80gb"] for r in z2] == sorted(r["max_batch_h100_80gb"] for r in z2)
    assert z2[0]["state_gb_per_rank"] == pytest.approx((2 * n + 14 * n / 8) / 1e9, abs=0.006)


def test_bad_cases_raise():
    p = argparse.ArgumentParser()
    add_step_args(p)
    from maws_fast.errors import ConfigError
    with pytest.raises(ConfigError, match="bad case"):
        bench_step(p.parse_args(["--cases", "mae:nope", "--out", ""]))
    with pytest.raises(ConfigError, match="unknown variant"):
        bench_step(p.parse_args(["--cases", "mae:tiny", "--variants", "fast", "--out", ""]))


def test_packed_attention_flops_are_counted():
    # the MAE's triton path runs attention_qkvpacked: its FLOPs must reach the tally (4 B H N^2 D fwd, 2x bwd)
    from maws_kernels import attention_qkvpacked

    def build():
        def make(b):
            qkv = torch.randn(b, 10, 3, 2, 16, requires_grad=True)
            return lambda: attention_qkvpacked(qkv, backend="triton").sum()
        return make

    r = per_image(build, batch=2)
    assert r.attn_flops == 3 * 4 * 2 * 10 * 10 * 16


def _step_args(*argv):
    p = argparse.ArgumentParser()
    add_step_args(p)
    return p.parse_args(list(argv))


@pytest.mark.slow
def test_compile_variants_of_every_mode_and_case_compile_without_hitting_the_limit(tmp_path):
    """MAE then WSP, ours compile in each checkpoint mode (dynamo's eager backend): six models whose
    blocks share one code object; each variant compiles from empty caches, none hits the limit."""
    out = tmp_path / "step.json"
    rows = bench_step(_step_args("--cases", "mae:tiny,wsp:tiny", "--variants", "ours compile,official compile",
                                 "--measure", "yes", "--device", "cpu", "--steps", "1", "--warmup", "0",
                                 "--batch-size", "2", "--checkpoint", "none,selective,full",
                                 "--compile-backend", "eager", "--out", str(out)))
    assert [(r["stage"], r["variant"], r["activation_checkpoint"]) for r in rows] == [
        (s, v, m) for s in ("mae", "wsp") for v, ms in (("ours compile", ("none", "selective", "full")),
                                                        ("official compile", ("none",))) for m in ms]
    for r in rows:
        assert "status" not in r, r.get("error")
        assert r["img_s"] > 0 and r["compile_backend"] == "eager" and r["graph_breaks"] == 0
        # ours: one graph per kind of block (MAE: encoder and decoder); official: the whole model
        assert r["compiled_graphs"] == (2 if (r["stage"], r["variant"]) == ("mae", "ours compile") else 1), r
    assert json.loads(out.read_text()) == rows


def test_a_failing_variant_keeps_the_rows_before_and_after_it(tmp_path, monkeypatch):
    """Each row is in the file (a valid JSON list) the moment it is measured; a variant that raises
    is a labelled row and the next one runs."""
    import maws_fast.bench.step as step

    out = tmp_path / "step.json"
    out.write_text(json.dumps([{"bench": "step", "earlier": "run"}]))
    seen = []

    def count(stage, preset, variant, num_classes, batch, mode="none"):
        seen.append(len(json.loads(out.read_text())))  # what a kill at this moment would leave
        if mode == "selective":
            raise RuntimeError("out of memory\nsecond line")
        return {"mem_mb_per_img": 1.0, "gemm_gflop_per_img": 1.0, "attn_gflop_per_img": 0.1, "saved_mb_per_img": 1.0,
                "model_gflop_per_img": 1.0, "pred_h100_img_s": 1, "pred_h100_mfu": 0.1, "pred_h200_img_s": 1,
                "pred_h200_mfu": 0.1, "top_ops_mb": {}}

    monkeypatch.setattr(step, "count_variant", count)
    rows = bench_step(_step_args("--cases", "mae:tiny", "--variants", "official eager,ours eager", "--measure", "no",
                                 "--checkpoint", "none,selective,full", "--out", str(out)))
    assert seen == [1, 2, 3, 4]  # the earlier run's row, then one more before each variant
    assert [(r["variant"], r["activation_checkpoint"], r.get("status")) for r in rows] == [
        ("official eager", "none", None), ("ours eager", "none", None), ("ours eager", "selective", "failed"),
        ("ours eager", "full", None)]
    assert rows[2]["error"] == "RuntimeError: out of memory"
    assert rows[3]["saved_vs_none"] == 1.0 and "saved_vs_none" not in rows[2]
    assert json.loads(out.read_text()) == [{"bench": "step", "earlier": "run"}, *rows]


def test_peak_memory_window_opens_after_the_warm_up(monkeypatch):
    """The peak is measured over timed steps only: the warm-up (here: the compile) is done before the
    window opens, even with --warmup 0."""
    import torch._dynamo

    import maws_fast.bench.step as step
    from maws_fast.bench.step import measure_variant

    events = []

    class Window:
        def open(self):
            events.append(("open", int(torch._dynamo.utils.counters["stats"]["unique_graphs"])))

        def peak(self):
            events.append(("peak", int(torch._dynamo.utils.counters["stats"]["unique_graphs"])))
            return 3 * 2**30

    monkeypatch.setattr(step, "peak_memory", lambda device: Window())
    before = int(torch._dynamo.utils.counters["stats"]["unique_graphs"])
    row = measure_variant("wsp", "tiny", "ours compile", 10, 2, torch.device("cpu"), steps=1, warmup=0,
                          backend_name="eager")
    assert [e for e, _ in events] == ["open", "peak"]
    assert events[0][1] > before  # compiled before the window opened
    assert row["peak_mem_gb"] == 3.0 and row["compiled_graphs"] == 1


def test_a_misspelt_compile_backend_is_one_error_before_any_variant(capsys):
    from maws_fast.cli.bench import bench_main

    assert bench_main(["step", "--cases", "mae:tiny", "--variants", "ours compile", "--measure", "yes",
                       "--compile-backend", "warp_drive", "--out", ""]) == 2
    assert "--compile-backend 'warp_drive' is not a torch.compile backend" in capsys.readouterr().err
