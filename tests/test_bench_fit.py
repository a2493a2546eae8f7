"""The fit table's fine-tune and LiT rows: their cases, LiT's model state and forward peak, and the
count builders behind them (fake tensors; small presets, a small count batch)."""
import argparse
import math

import pytest
import torch
from torch._subclasses.fake_tensor import FakeTensorMode

from maws_fast.bench import fit
from maws_fast.bench.step import FIT_PRESETS, _fit_model, _FullCaptions, add_step_args, bench_fit, bench_step
from maws_fast.config import Config, LiTConfig, model_preset
from maws_fast.errors import ConfigError


def test_fine_tunes_run_at_every_resolution_their_patch_divides():
    cases = fit.fit_cases(list(FIT_PRESETS), list(fit.STAGES))
    for preset in FIT_PRESETS:
        patch = model_preset(preset).patch_size
        ft = [r for s, p, r in cases if (s, p) == ("finetune", preset)]
        assert ft == [r for r in (224, 448, 512, 518) if r % patch == 0]
        assert ft == ([224, 448, 512] if patch == 16 else [224, 448, 518])
        for stage in ("mae", "wsp", "lit"):
            assert [r for s, p, r in cases if (s, p) == (stage, preset)] == [224]
    assert len(cases) == len(FIT_PRESETS) * (3 + 3)


def _lit_hand_count() -> tuple[int, int, int]:
    """(trainable, locked, one text block) parameters of the tiny LiT, counted by hand: a block is
    two LayerNorms (2w each), qkv (3w^2 + 3w), proj (w^2 + w), fc1 (4w^2 + 4w), fc2 (4w^2 + w)."""
    lc, m = LiTConfig(), model_preset("tiny")

    def block(w):
        return 12 * w * w + 13 * w

    w, d = lc.width, m.embed_dim
    text = lc.vocab_size * w + lc.context_length * w + lc.depth * block(w) + 2 * w
    trainable = text + d * lc.embed_dim + w * lc.embed_dim + 1  # the two projections, logit_scale
    grid = (m.img_size // m.patch_size) ** 2
    locked = (d * m.in_chans * m.patch_size ** 2 + d) + d + (grid + 1) * d + m.depth * block(d) + 2 * d
    return trainable, locked, block(w)


def test_lit_state_is_the_text_side_plus_the_locked_towers_bf16_copy():
    trainable, locked, block = _lit_hand_count()
    with FakeTensorMode():
        n, largest, root, depth, frozen = fit._param_counts(_fit_model("lit", "tiny", 28, 10, 10))
    assert (n, frozen, largest, depth) == (trainable, locked, block, LiTConfig().depth)
    assert root == trainable - LiTConfig().depth * block
    for zs, world in ((2, 8), (3, 8), (3, 64)):
        # 16 B per trainable parameter, sharded as the stage shards; 2 B per locked one on every rank
        want = {2: 2 * trainable + 14 * trainable / world, 3: 16 * trainable / world}[zs] + 2 * locked
        assert fit.state_bytes(n, zs, world, frozen) == want
    acts = {"none": 3e6, "full": 1e6}
    rows = fit.fit_rows([("lit", "tiny", 28)], list(fit.ENGINES), list(acts), {"tiny": 8}, 2,
                        lambda s, p, r: _fit_model(s, p, r, 10, 10), lambda s, p, r, mode: acts[mode],
                        lambda s, p, r, mode: 2.5e6)
    assert {r["engine"] for r in rows} == {"ours:2", "ours:3"}  # the lit stage refuses fsdp2
    for r in rows:
        zs = fit.ENGINES[r["engine"]][1]
        fixed = fit.state_bytes(n, zs, 8, locked) + fit.working_set_bytes(block, root, zs)
        # none: the peak (2.5) is below what backward keeps (3); full: 1 + (3 - 1) / 4 blocks = 1.5 < the peak
        eff = {"none": 3e6, "full": 2.5e6}[r["activation_checkpoint"]]
        assert r["max_batch_h100_80gb"] == math.floor((fit.HEADROOM * 80e9 - fixed) / eff)
        assert r["locked_params_m"] == round(locked / 1e6, 1) and r["peak_mb_per_img"] == 2.5


@pytest.mark.parametrize("zero_stage", [0, 3])
def test_the_engine_keeps_no_gradient_or_optimizer_state_for_the_locked_tower(zero_stage, seeded):
    """What the LiT rows assume, against our engine after a real LiT step: its model state is 16 B per
    trainable parameter, and the locked tower is a bf16 copy with no gradient."""
    from maws_fast.parallel.engine import AdamWSpec, build_engine
    from maws_fast.parallel.mesh import ParallelDims, ParallelLayout, single_process
    from maws_fast.train.lit import build_lit
    from maws_fast.train.objectives import LiTObjective
    from maws_fast.train.optim import param_groups

    cfg = Config()
    lit = build_lit(cfg, cfg.lit.vocab_size)
    trainable, locked, _ = _lit_hand_count()
    e = build_engine(LiTObjective(lit, None), single_process(),
                     ParallelLayout(ParallelDims(1), zero_stage=zero_stage, param_dtype="bf16"),
                     AdamWSpec.of(lit, param_groups(lit, 0.1)))
    e.zero_grad()
    ids = torch.randint(1, cfg.lit.vocab_size, (3, 6))
    e.backward(e.objective(torch.randn(3, 1, 28, 28), ids, 0))
    e.step(1e-4, None)
    assert sum(e.memory_report().values()) == fit.state_bytes(trainable, zero_stage, 1) == 16 * trainable
    tower = list(lit.vision_encoder.parameters())
    assert sum(p.numel() for p in tower) == locked
    assert all(p.dtype == torch.bfloat16 and p.grad is None and not p.requires_grad for p in tower)


def test_the_counted_text_forward_is_the_towers_on_full_captions(seeded):
    from maws_fast.models.text import TextTransformer

    text = TextTransformer(50, 7, 32, 2, 4)
    ids = torch.randint(1, 50, (3, 7))  # no pad_id (0): every caption fills the context
    torch.testing.assert_close(_FullCaptions(text)(ids), text(ids), rtol=0, atol=0)
    text(ids).sum().backward()
    want = {n: p.grad.clone() for n, p in text.named_parameters()}
    text.zero_grad()
    _FullCaptions(text)(ids).sum().backward()
    for n, p in text.named_parameters():
        torch.testing.assert_close(p.grad, want[n], msg=n)


def test_the_fit_table_has_every_case_and_a_fine_tune_at_448_keeps_four_times_224():
    """bench_fit on the tiny preset (patch 4: fine-tunes at 224, 448 and 512), count batch 2."""
    rows = bench_fit(10, 2, ["none", "full"], {}, ["finetune", "lit"], {"tiny": 2}, finetune_classes=10)
    keys = [(r["stage"], r["resolution"], r["engine"], r["activation_checkpoint"]) for r in rows]
    assert keys == [("finetune", res, e, m) for res in (224, 448, 512) for e in fit.ENGINES for m in ("none", "full")] + [
        ("lit", 28, e, m) for e in ("ours:2", "ours:3") for m in ("none", "full")]
    assert all(r["computed"] and r["max_batch_h100_80gb"] > 0 for r in rows)
    act = {(r["resolution"], r["activation_checkpoint"]): r["saved_mb_per_img"] for r in rows if r["stage"] == "finetune"}
    for mode in ("none", "full"):
        # activations grow with the tokens and pixels (4x from 224 to 448), less a per-image part that does not
        assert 3.6 < act[448, mode] / act[224, mode] < 4.05
        assert act[512, mode] > act[448, mode]
    for r in (r for r in rows if r["stage"] == "lit"):
        assert r["act_mb_per_img"] >= r["peak_mb_per_img"] >= r["saved_mb_per_img"] > 0
        assert (r["text_width"], r["context_length"]) == (LiTConfig().width, LiTConfig().context_length)


def test_a_locked_b16_towers_forward_holds_more_than_lit_keeps_for_backward():
    """At ViT-B/16 the locked tower's no_grad forward (one block's intermediates at a time) is what
    bounds a LiT batch: several times what the text side keeps for backward."""
    from maws_fast.bench.step import _fit_count_build
    from maws_fast.bench.traffic import per_image

    build = _fit_count_build("lit", "vit_b16", 224, 10, 10, "none")
    kept, peak = per_image(build, 2).live_bytes, fit.forward_peak(build, 2)
    assert peak > 3 * kept > 0
    # one block's working set: the residual stream and a few more (197, 768) bf16 rows, the MLP's 4x-wide ones
    assert 197 * 768 * 2 * 8 < peak < 197 * 768 * 2 * 24


def test_bad_fit_arguments_are_one_error_before_any_count():
    p = argparse.ArgumentParser()
    add_step_args(p)
    for argv, match in ((["--fit-stages", "mae,pretrain"], "--fit-stages"), (["--fit-presets", "tiny"], "--fit-presets"),
                        (["--fit-finetune-classes", "0"], "--fit-finetune-classes")):
        with pytest.raises(ConfigError, match=match):
            bench_step(p.parse_args(["--cases", "mae:tiny", "--measure", "no", "--fit", "--out", "", *argv]))
