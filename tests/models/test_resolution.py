"""Any resolution: a checkpoint trained on one patch grid loads into a model on another. A learned
pos-embed is resampled bicubically (the official interpolate_pos_embed rule), a fixed sin-cos table
is the model's own for its grid; the load report says which."""
import pytest
import torch

from maws_fast.errors import CheckpointError
from maws_fast.models import MaskedAutoencoderViT, VisionTransformer, load_pretrained
from maws_fast.models.pos_embed import resample_pos_embed, sincos_2d

# Bicubic (PyTorch's A = -0.75, align_corners=False, edge taps clamped) of the column ramp [0, 1] onto 4
# columns, worked by hand: the output columns sit at source x = -0.25, 0.25, 0.75, 1.25. At x = 0.25 the
# taps (-1, 0, 1, 2) -> values (0, 0, 1, 1) weigh (-0.10546875, 0.87890625, 0.26171875, -0.03515625),
# so 0.26171875 - 0.03515625 = 0.2265625; at x = -0.25 only tap 1 holds a 1, weighing -0.10546875; the
# other two follow by symmetry (1 - each).
RAMP_2_TO_4 = [-0.10546875, 0.2265625, 0.7734375, 1.10546875]


def test_resample_matches_the_hand_computed_bicubic_case():
    D = 3
    grid2 = torch.tensor([[0.0, 1.0], [0.0, 1.0]])  # value = column index, in every channel
    cls = torch.randn(1, 1, D)
    table = torch.cat([cls, grid2.reshape(1, 4, 1).expand(1, 4, D)], dim=1)
    out = resample_pos_embed(table, 4)
    assert out.shape == (1, 17, D)
    assert torch.equal(out[:, :1], cls)  # the cls row is kept exactly
    want = torch.tensor(RAMP_2_TO_4).repeat(4)  # row-major 4x4: every row is the ramp
    torch.testing.assert_close(out[0, 1:, 0], want, rtol=0, atol=1e-7)
    assert torch.equal(out[0, 1:, 0], out[0, 1:, 2])


def test_resample_keeps_dtype_and_same_grid_is_identity(seeded):
    t = torch.randn(1, 1 + 9, 8, dtype=torch.bfloat16)
    assert resample_pos_embed(t, 3) is t
    assert resample_pos_embed(t, 5).dtype == torch.bfloat16
    with pytest.raises(ValueError, match="not a square patch grid"):
        resample_pos_embed(torch.randn(1, 1 + 10, 8), 4)


def _vit(img, learnable=True, **kw):
    return VisionTransformer(img_size=img, patch_size=8, embed_dim=32, depth=1, num_heads=2, num_classes=5,
                             pos_embed_learnable=learnable, **kw)


def test_learned_pos_embed_is_resampled_on_load(seeded):
    small = _vit(16)  # grid 2
    with torch.no_grad():
        small.pos_embed.normal_()
    big = _vit(40)  # grid 5
    report = load_pretrained(big, small.state_dict())
    assert report.resampled == ["pos_embed 2x2 -> 5x5"] and not report.regenerated
    assert "pos_embed" in report.loaded and "pos_embed" not in report.initialised
    assert "resampled bicubically: pos_embed 2x2 -> 5x5" in report.summary()
    torch.testing.assert_close(big.pos_embed.data, resample_pos_embed(small.pos_embed.data, 5), rtol=0, atol=0)
    torch.testing.assert_close(big.blocks[0].mlp.fc1.weight, small.blocks[0].mlp.fc1.weight)
    assert big(torch.randn(2, 3, 40, 40)).shape == (2, 5)  # runs on the new grid


def test_fixed_sincos_tables_are_the_models_own_for_its_grid(seeded):
    kw = dict(patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2, decoder_embed_dim=8, decoder_depth=1,
              decoder_num_heads=2)
    src = MaskedAutoencoderViT(img_size=16, **kw)  # grid 4
    dst = MaskedAutoencoderViT(img_size=28, **kw)  # grid 7
    report = load_pretrained(dst, src.state_dict(), strict=True)  # not missing: regenerated
    assert sorted(report.regenerated) == ["decoder_pos_embed 4x4 -> 7x7", "pos_embed 4x4 -> 7x7"]
    assert not report.resampled and not report.initialised
    torch.testing.assert_close(dst.pos_embed.data[0], sincos_2d(16, 7), rtol=0, atol=0)
    torch.testing.assert_close(dst.decoder_pos_embed.data[0], sincos_2d(8, 7), rtol=0, atol=0)
    assert "sin-cos regenerated" in report.summary()


def test_a_fine_tune_at_another_size_takes_the_mae_table_resampled(seeded):
    """The official fine-tune: a learnable pos-embed initialised from the MAE's fixed sin-cos table."""
    mae = MaskedAutoencoderViT(img_size=16, patch_size=8, embed_dim=32, depth=1, num_heads=2, decoder_embed_dim=16,
                               decoder_depth=1, decoder_num_heads=2)
    ft = _vit(24)  # grid 3, learnable
    report = load_pretrained(ft, mae.state_dict())
    assert report.resampled == ["pos_embed 2x2 -> 3x3"]
    torch.testing.assert_close(ft.pos_embed.data, resample_pos_embed(mae.pos_embed.data, 3), rtol=0, atol=0)


def test_other_mismatches_still_refuse(seeded):
    other_width = VisionTransformer(img_size=16, patch_size=8, embed_dim=48, depth=1, num_heads=2,
                                    pos_embed_learnable=True)
    with pytest.raises(CheckpointError, match="shape mismatch"):
        load_pretrained(_vit(40), other_width.state_dict())


def test_vit_runs_at_an_odd_grid(seeded):
    m = VisionTransformer(img_size=42, patch_size=14, embed_dim=32, depth=1, num_heads=2, num_classes=3)
    assert m.patch_embed.num_patches == 9 and m.pos_embed.shape == (1, 10, 32)
    assert m(torch.randn(1, 3, 42, 42)).shape == (1, 3)
    with pytest.raises(ValueError, match="not divisible"):
        VisionTransformer(img_size=40, patch_size=14)
