"""The loop's helpers: the config-fingerprint guard, MAE's weight-decay groups, the lr schedule."""
import pytest

from maws_fast.train import checkpoint as ckpt
from maws_fast.train.optim import param_groups


def test_config_diff_names_dotted_keys():
    assert ckpt.config_diff({"a": {"b": 1, "c": 2}}, {"a": {"b": 1, "c": 3}, "d": 4}) == ["a.c: 2 -> 3", "d: None -> 4"]


def test_weight_decay_groups_follow_mae():
    from maws_fast.config import model_preset
    from maws_fast.models import build_mae

    model = build_mae(model_preset("tiny"))
    decay, no_decay = param_groups(model, 0.05)
    names = {id(p): n for n, p in model.named_parameters()}
    decayed = {names[id(p)] for p in decay["params"]}
    plain = {names[id(p)] for p in no_decay["params"]}
    assert {"cls_token", "mask_token", "blocks.0.attn.qkv.weight", "patch_embed.proj.weight"} <= decayed
    assert {"blocks.0.attn.qkv.bias", "blocks.0.norm1.weight", "norm.bias", "patch_embed.proj.bias"} <= plain
    assert "pos_embed" not in decayed | plain and "decoder_pos_embed" not in decayed | plain  # frozen
    assert decay["weight_decay"] == 0.05 and no_decay["weight_decay"] == 0.0


def test_schedule_warmup_then_cosine():
    from maws_fast.train.schedule import lr_at

    assert lr_at(0.0, 1.0, 0.0, 2.0, 10.0) == 0.0
    assert lr_at(1.0, 1.0, 0.0, 2.0, 10.0) == pytest.approx(0.5)
    assert lr_at(2.0, 1.0, 0.0, 2.0, 10.0) == pytest.approx(1.0)
    assert lr_at(6.0, 1.0, 0.1, 2.0, 10.0) == pytest.approx(0.1 + 0.9 * 0.5)
    assert lr_at(10.0, 1.0, 0.1, 2.0, 10.0) == pytest.approx(0.1)
