"""ViT encoder: timm parity, attention backends, pretrained loading, presets, FLOP counts."""
import pytest
import torch

from maws_fast.config import PRESETS, model_preset
from maws_fast.errors import CheckpointError
from maws_fast.models import build_classifier, build_mae
from maws_fast.models.flops import flops_per_image, mae_flops
from maws_fast.models.mae import MaskedAutoencoderViT
from maws_fast.models.vit import VisionTransformer
from maws_fast.models.weights import load_pretrained

timm = pytest.importorskip("timm")


@pytest.mark.parametrize(
    "kw",
    [
        dict(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4, num_classes=0),
        dict(img_size=28, patch_size=4, in_chans=1, embed_dim=48, depth=3, num_heads=3, num_classes=7),
        dict(img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=2, num_heads=12, num_classes=0),
    ],
)
def test_matches_timm_given_same_weights(kw):
    ours = VisionTransformer(**kw, pos_embed_learnable=True).eval()
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=kw["img_size"], patch_size=kw["patch_size"], in_chans=kw["in_chans"], embed_dim=kw["embed_dim"],
        depth=kw["depth"], num_heads=kw["num_heads"], num_classes=kw["num_classes"], mlp_ratio=4.0, qkv_bias=True,
        class_token=True, global_pool="token", norm_layer=torch.nn.LayerNorm,
    ).eval()
    for m in ref.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-6
    with torch.no_grad():
        for p in ours.parameters():  # random, not init values: every weight must be wired right
            p.normal_(0, 0.05)
    ref.load_state_dict(ours.state_dict(), strict=True)  # same keys, same shapes
    x = torch.randn(2, kw["in_chans"], kw["img_size"], kw["img_size"])
    with torch.no_grad():
        torch.testing.assert_close(ours.forward_features(x), ref.forward_features(x), rtol=0, atol=1e-5)
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)


def test_attention_backends_agree():
    model = VisionTransformer(img_size=28, patch_size=4, in_chans=1, embed_dim=64, depth=2, num_heads=4).eval()
    x = torch.randn(3, 1, 28, 28)
    with torch.no_grad():
        a = model.forward_features(x)
        model.set_attn_backend("manual")
        b = model.forward_features(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        model.set_attn_backend("flash")


def test_mae_weights_into_classifier_report_dropped_and_initialised():
    cfg = model_preset("tiny")
    mae = build_mae(cfg, norm_pix_loss=True)
    clf = build_classifier(cfg, num_classes=14)
    report = load_pretrained(clf, mae.state_dict(), source="mae.safetensors")
    assert sorted(report.initialised) == ["head.bias", "head.weight"]
    assert "mask_token" in report.dropped and all(
        k == "mask_token" or k.startswith("decoder") for k in report.dropped
    )
    assert len(report.loaded) == len(mae.encoder_state_dict())
    torch.testing.assert_close(clf.blocks[1].mlp.fc1.weight, mae.blocks[1].mlp.fc1.weight)
    assert "dropped" in report.summary() and "decoder_blocks" in report.summary()


def test_shape_mismatch_names_the_keys():
    small = build_classifier(model_preset("tiny"), num_classes=3)
    wide = build_classifier(model_preset("tiny", embed_dim=96, num_heads=4), num_classes=3)
    with pytest.raises(CheckpointError, match=r"blocks\.0\.attn\.qkv\.weight.*\(288, 96\) vs model \(384, 128\)"):
        load_pretrained(small, wide.state_dict(), source="ckpt")
    with pytest.raises(CheckpointError, match="unexpected keys"):
        load_pretrained(small, {**small.state_dict(), "extra.weight": torch.zeros(1)}, strict=True)


def test_presets_construct_the_model_zoo_shapes():
    expect = {"vit_b16": (768, 12, 12, 16), "vit_l16": (1024, 24, 16, 16), "vit_h14": (1280, 32, 16, 14),
              "vit_2b14": (2560, 24, 32, 14), "vit_6.5b14": (4096, 32, 32, 14)}
    for name, (d, depth, heads, p) in expect.items():
        c = model_preset(name)
        assert (c.embed_dim, c.depth, c.num_heads, c.patch_size) == (d, depth, heads, p)
        assert (c.decoder_embed_dim, c.decoder_depth, c.decoder_num_heads) == (512, 8, 16)
    assert int(model_preset("vit_2b14").embed_dim * 4.0) == 10240
    assert int(model_preset("vit_6.5b14").embed_dim * 4.0) == 16384
    assert set(PRESETS) >= {"tiny", *expect}
    # B/16 encoder has the well-known 85.8M parameters (no head)
    with torch.device("meta"):
        enc = VisionTransformer(**{k: getattr(model_preset("vit_b16"), k) for k in
                                   ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads")})
    n = sum(p.numel() for p in enc.parameters())
    assert 85.7e6 < n < 85.9e6


def test_flops_match_design_reference_points():
    b16 = mae_flops(model_preset("vit_b16"))
    assert b16["train"] / 1e9 == pytest.approx(59, abs=1.0)
    assert 0.45 < b16["decoder_fwd"] / b16["forward"] < 0.6  # the decoder is about half
    assert flops_per_image(model_preset("vit_l16"), "mae") / 1e9 == pytest.approx(124, abs=1.5)
    # masked patch embed saves 3/4 of the embedding FLOPs and nothing else
    saved = mae_flops(model_preset("vit_b16"))["forward"] - mae_flops(model_preset("vit_b16"), masked_embed=True)["forward"]
    assert saved == pytest.approx(2 * (196 - 49) * 768 * 768)
    tiny = model_preset("tiny")
    assert flops_per_image(tiny, "wsp", 14) > flops_per_image(tiny, "linprobe", 14) > flops_per_image(tiny, "eval", 14) / 1.01
    with pytest.raises(ValueError, match="unknown stage"):
        flops_per_image(tiny, "bogus")


def test_flops_agree_with_counted_matmuls():
    """Cross-check the analytic count against torch's FLOP counter on a tiny model."""
    from torch.utils.flop_counter import FlopCounterMode

    cfg = model_preset("tiny")
    model = MaskedAutoencoderViT(**{k: getattr(cfg, k) for k in (
        "img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
        "decoder_embed_dim", "decoder_depth", "decoder_num_heads", "mlp_ratio")}, attn_backend="manual")
    x = torch.randn(4, 1, 28, 28)
    with FlopCounterMode(display=False) as fc:
        loss, _, _ = model(x)
        loss.backward()
    counted = fc.get_total_flops() / 4
    assert counted == pytest.approx(mae_flops(cfg)["train"], rel=0.02)
