"""maws_kernels.patch_timm: a patched timm ViT computes what the unpatched one does.

Outputs and every parameter gradient equal the unpatched timm model's, on the torch backend and
on the Triton kernels under the interpreter, for a ViT-B/16 at 224 and a one-block model; weights,
state_dict keys and the parameters an optimizer holds are untouched.
"""
import copy
import logging

import pytest
import torch

import maws_kernels
from maws_kernels import nn as mnn

# The CPU tests here run Triton on CPU tensors (interpreted); the gpu-marked ones run compiled kernels.
pytestmark = pytest.mark.interpreter

timm = pytest.importorskip("timm")


def _tiny(**kw):
    return timm.models.vision_transformer.VisionTransformer(
        **{"img_size": 32, "patch_size": 8, "embed_dim": 48, "depth": 1, "num_heads": 3, "num_classes": 7, **kw})


def _fwd_bwd(model, x):
    out = model(x)
    (out * torch.linspace(-1, 1, out.shape[-1])).sum().backward()
    return out.detach(), {n: p.grad for n, p in model.named_parameters()}


def _check(model, x, backend, attn_backend, tol):
    patched = copy.deepcopy(model)
    params_before = [id(p) for p in patched.parameters()]
    keys_before = list(patched.state_dict())
    replaced = maws_kernels.patch_timm(patched, backend=backend, attn_backend=attn_backend)
    depth = len(model.blocks)
    assert sum(isinstance(m, mnn.Attention) for m in patched.modules()) == depth
    assert sum(isinstance(m, mnn.Mlp) for m in patched.modules()) == depth
    # 2 norms per block + the final norm (fc_norm is an Identity with the token pool)
    assert sum(isinstance(m, mnn.LayerNorm) for m in patched.modules()) == 2 * depth + 1
    assert len(replaced) == 4 * depth + 1
    assert [id(p) for p in patched.parameters()] == params_before
    assert list(patched.state_dict()) == keys_before
    want, want_g = _fwd_bwd(model, x)
    got, got_g = _fwd_bwd(patched, x)
    assert torch.allclose(got, want, rtol=tol, atol=tol), (got - want).abs().max()
    for n, g in want_g.items():
        assert torch.allclose(got_g[n], g, rtol=tol, atol=tol * max(1.0, g.abs().max().item())), n


@pytest.mark.parametrize("backend,attn_backend", [("torch", "sdpa"), ("triton", "triton")])
def test_one_block(seeded, backend, attn_backend):
    _check(_tiny().eval(), torch.randn(2, 3, 32, 32), backend, attn_backend, 1e-5)


@pytest.mark.slow
@pytest.mark.parametrize("backend,attn_backend,img", [("torch", "sdpa", 224), ("triton", "triton", 64)])
def test_vit_b16(seeded, backend, attn_backend, img):
    """ViT-B/16 (768 wide, 12 blocks, 12 heads). Under the interpreter (~1 ms per program) at 64 px,
    17 tokens: at 224 px the Triton case alone takes ~5 minutes on 2 cores."""
    model = timm.create_model("vit_base_patch16_224", pretrained=False, img_size=img).eval()
    _check(model, torch.randn(1, 3, img, img), backend, attn_backend, 2e-4)


def test_patched_model_trains_with_drop_path(seeded):
    """In training with drop path (applied by timm's Block, outside what is swapped) the patched model
    matches too, given the same RNG draws."""
    model = _tiny(drop_path_rate=0.3).train()
    patched = copy.deepcopy(model)
    maws_kernels.patch_timm(patched)
    x = torch.randn(4, 3, 32, 32)
    torch.manual_seed(3)
    want, _ = _fwd_bwd(model, x)
    torch.manual_seed(3)
    got, _ = _fwd_bwd(patched, x)
    assert torch.allclose(got, want, atol=1e-5)


def test_keeps_what_it_cannot_replace():
    model = _tiny(qk_norm=True, proj_drop_rate=0.1)
    replaced = maws_kernels.patch_timm(model)
    # q/k norms and dropout: attention and MLP are kept; the norms (q_norm / k_norm too) are swapped
    assert not any(isinstance(m, (mnn.Attention, mnn.Mlp)) for m in model.modules())
    assert all(isinstance(replaced[n], torch.nn.LayerNorm) for n in replaced)
    assert replaced.kept == {"blocks.0.attn": "it has a q_norm",
                             "blocks.0.mlp": "drop1=0.1 > 0: maws_kernels.nn.Mlp has no dropout"}
    with pytest.raises(ValueError, match="nothing in this Linear could be swapped"):
        maws_kernels.patch_timm(torch.nn.Linear(3, 3))
    with pytest.raises(ValueError, match="attn_backend"):
        maws_kernels.patch_timm(_tiny(), attn_backend="flash")


def test_patched_model_under_the_optimizer(seeded):
    """An optimizer built before the patch still steps the model's parameters."""
    model = _tiny()
    opt = maws_kernels.FusedAdamW(model.parameters(), lr=1e-2, backend="torch")
    maws_kernels.patch_timm(model)
    before = model.head.weight.detach().clone()
    model(torch.randn(2, 3, 32, 32)).sum().backward()
    opt.step()
    assert not torch.equal(before, model.head.weight)


def test_leaves_lookalikes_alone():
    """timm classes of the same names with other arithmetic: BEiT's Attention (q / v biases, relative
    position bias) and the channels-first LayerNorm2d are never swapped."""
    beit = timm.create_model("beit_base_patch16_224", pretrained=False, img_size=32, depth=1)
    keys = list(beit.state_dict())
    maws_kernels.patch_timm(beit)
    assert not any(isinstance(m, mnn.Attention) for m in beit.modules())
    assert list(beit.state_dict()) == keys
    from timm.layers import LayerNorm2d

    seq = torch.nn.Sequential(LayerNorm2d(8), torch.nn.LayerNorm(8))
    replaced = maws_kernels.patch_timm(seq)
    assert list(replaced) == ["1"] and type(seq[0]) is LayerNorm2d


def test_reports_what_it_left_alone(caplog):
    """attn_drop > 0: every attention is kept, each named with its reason, counted and logged in one line."""
    model = _tiny(depth=2, attn_drop_rate=0.1)
    with caplog.at_level(logging.INFO, logger="maws_kernels"):
        report = maws_kernels.patch_timm(model)
    want_kept = {f"blocks.{i}.attn" for i in range(2)}
    assert set(report.kept) == want_kept
    assert all(why.startswith("attn_drop=0.1 > 0") for why in report.kept.values())
    assert report.counts == {"swapped": {"LayerNorm": 5, "Mlp": 2}, "kept": {"Attention": 2}}
    assert len(report) == 7 and all(isinstance(model.get_submodule(n), timm.layers.Attention) for n in want_kept)
    records = [r for r in caplog.records if r.name == "maws_kernels"]
    assert len(records) == 1 and records[0].levelno == logging.WARNING
    assert records[0].getMessage() == report.summary()
    assert "swapped 7 modules" in report.summary() and "left 2 alone (2 Attention)" in report.summary()
    assert "blocks.0.attn" in report.summary()


def test_reports_nothing_left_alone_for_a_plain_vit(caplog):
    with caplog.at_level(logging.INFO, logger="maws_kernels"):
        report = maws_kernels.patch_timm(_tiny())
    assert report.kept == {}
    assert report.counts == {"swapped": {"LayerNorm": 3, "Attention": 1, "Mlp": 1}, "kept": {}}
    records = [r for r in caplog.records if r.name == "maws_kernels"]
    assert len(records) == 1 and records[0].levelno == logging.INFO
    assert records[0].getMessage() == "patch_timm: swapped 5 modules (3 LayerNorm, 1 Attention, 1 Mlp); left none alone"
