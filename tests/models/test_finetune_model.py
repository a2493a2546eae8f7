"""The fine-tune model: global average pooling + fc_norm (timm / official MAE keys and numbers),
stochastic depth by timm's linear rule, off at eval, reproducible from its generator, and the same
on the fused blocks as on the torch ones."""
import copy

import pytest
import torch

from maws_fast.models import VisionTransformer
from maws_fast.models.vit import Block, DropPath

KW = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=3, num_heads=3, num_classes=7)


def test_avg_pool_matches_timm_given_same_weights():
    timm = pytest.importorskip("timm")
    ours = VisionTransformer(**KW, pos_embed_learnable=True, global_pool="avg").eval()
    ref = timm.models.vision_transformer.VisionTransformer(
        img_size=32, patch_size=8, in_chans=3, embed_dim=48, depth=3, num_heads=3, num_classes=7, qkv_bias=True,
        class_token=True, global_pool="avg", fc_norm=True, norm_layer=torch.nn.LayerNorm).eval()
    for m in ref.modules():
        if isinstance(m, torch.nn.LayerNorm):
            m.eps = 1e-6
    with torch.no_grad():
        for p in ours.parameters():
            p.normal_(0, 0.05)
    keys = set(ours.state_dict())
    assert "fc_norm.weight" in keys and not any(k.startswith("norm.") for k in keys)  # the official FT keys
    ref.load_state_dict(ours.state_dict(), strict=True)
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), ref(x), rtol=0, atol=1e-5)


def test_drop_path_rates_follow_timms_linear_rule():
    m = VisionTransformer(**KW, drop_path_rate=0.3)
    assert [b.drop_path1.p for b in m.blocks] == pytest.approx([0.0, 0.15, 0.3])
    assert all(b.drop_path1.p == b.drop_path2.p for b in m.blocks)
    assert VisionTransformer(**{**KW, "depth": 1}, drop_path_rate=0.3).blocks[0].drop_path1.p == 0.0


def test_drop_path_drops_whole_samples_and_rescales(seeded):
    dp = DropPath(0.5).train()
    x = torch.randn(4000, 3, 2) + 5
    y = dp(x)
    ratio = y / x
    per_sample = ratio.reshape(4000, -1)
    assert torch.all((per_sample == 0).all(1) | (per_sample == 2).all(1))  # zeroed or scaled by 1 / keep
    assert 0.45 < (per_sample[:, 0] == 0).float().mean() < 0.55
    assert dp.eval()(x) is x and DropPath(0.0).train()(x) is x


def test_drop_path_is_reproducible_from_its_generator_and_off_at_eval(seeded):
    m = VisionTransformer(**KW, drop_path_rate=0.5).train()
    x = torch.randn(8, 3, 32, 32)
    outs = []
    for _ in range(2):
        m.set_drop_path_generator(torch.Generator().manual_seed(7))
        outs.append(m(x))
    assert torch.equal(outs[0], outs[1])
    m.set_drop_path_generator(torch.Generator().manual_seed(8))
    assert not torch.equal(m(x), outs[0])
    m.eval()
    ref = VisionTransformer(**KW).eval()
    ref.load_state_dict(m.state_dict())
    torch.testing.assert_close(m(x), ref(x), rtol=0, atol=0)  # eval: no stochastic depth at all


@pytest.mark.interpreter
@pytest.mark.parametrize("pool", ["token", "avg"])
def test_fused_blocks_with_drop_path_match_torch(pool, seeded):
    ref = VisionTransformer(**KW, drop_path_rate=0.4, global_pool=pool, pos_embed_learnable=True,
                            kernel_backend="torch").train()
    fused = copy.deepcopy(ref)
    fused.set_kernel_backend("triton")
    x = torch.randn(6, 3, 32, 32)
    outs = []
    for m in (ref, fused):
        m.set_drop_path_generator(torch.Generator().manual_seed(3))  # the same draws in the same order
        y = m(x)
        y.square().sum().backward()
        outs.append((y.detach(), {n: p.grad for n, p in m.named_parameters()}))
    torch.testing.assert_close(outs[1][0], outs[0][0], rtol=1e-5, atol=1e-5)
    for n, g in outs[0][1].items():
        torch.testing.assert_close(outs[1][1][n], g, rtol=1e-4, atol=1e-5, msg=n)
    assert isinstance(fused.blocks[0], Block) and fused.blocks[1].fused_add_backend(x) == "triton"
