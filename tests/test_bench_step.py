"""The step benchmark's counting rule, its official-equivalent baselines, and a CPU smoke run.

Counted bytes are deterministic functions of the code (fake tensors, no timing), so they are
checked exactly here; speed is never asserted.
"""
import argparse

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
    args = p.parse_args(["--cases", "mae:tiny", "--variants", "official eager,ours eager", "--measure", "yes",
                         "--device", "cpu", "--steps", "1", "--warmup", "0", "--batch-size", "4",
                         "--count-batch", "2", "--out", str(out)])
    rows = bench_step(args)
    assert [r["variant"] for r in rows] == ["official eager", "ours eager"]
    for r in rows:
        assert r["mem_mb_per_img"] > 0 and r["img_s"] > 0 and r["pred_h100_img_s"] > 0
        assert r["mfu"] is None  # no peak is known for a CPU
    assert rows[1]["mem_vs_official"] < 1
    assert out.exists()


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
