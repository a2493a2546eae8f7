"""Under bf16 no activation is promoted to fp32 between blocks: every Linear and LayerNorm of an MAE and
a WSP training step sees bf16 inputs (CPU runs bf16, so this holds for the GPU default too), with the
weights in bf16 (the GPU default, parallel.param_dtype=bf16) or fp32 under autocast, on the torch kernels
and on the fused ones (Triton, interpreted here), where the norms also take the residual adds."""
import pytest
import torch
import torch.nn as nn
import torch.nn.functional as F

import maws_kernels as mk
from maws_fast.config import model_preset
from maws_fast.models import build_classifier, build_mae
from maws_fast.train.objectives import wsp_loss


def _watch(model: nn.Module, monkeypatch) -> tuple[list, list]:
    """Record the input dtype of every LayerNorm call (branch and stream when a norm also adds the
    residual) and of every linear: through ``F.linear``, which nn.Linear calls and the fused blocks
    call directly for a projection whose bias a kernel adds."""
    seen, handles = [], []
    for name, m in model.named_modules():
        if isinstance(m, nn.LayerNorm):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: seen.extend((name, a.dtype) for a in args[:2] if isinstance(a, torch.Tensor))))
    real = F.linear

    pixels = model.patch_embed.proj.weight.untyped_storage().data_ptr()

    def linear(x, weight, bias=None):
        # the MAE's patch embed (a view of the conv weight) reads the pixels, not an activation
        if weight.untyped_storage().data_ptr() != pixels:
            seen.append(("linear", x.dtype))
        return real(x, weight, bias)
    monkeypatch.setattr(F, "linear", linear)
    real_ce = mk.linear_soft_target_cross_entropy

    def head_and_loss(feats, *args, **kwargs):  # WSP: the head's GEMM inside the loss kernel (Triton)
        seen.append(("head+loss", feats.dtype))
        return real_ce(feats, *args, **kwargs)
    monkeypatch.setattr(mk, "linear_soft_target_cross_entropy", head_and_loss)
    return seen, handles


@pytest.mark.interpreter
@pytest.mark.parametrize("kernels", ["torch", "triton"])
@pytest.mark.parametrize("weights", ["bf16", "fp32"])
@pytest.mark.parametrize("stage", ["mae", "wsp"])
def test_every_linear_and_layernorm_input_is_bf16(seeded, monkeypatch, stage, weights, kernels):
    cfg = model_preset("tiny", kernel_backend=kernels)
    model = build_mae(cfg, norm_pix_loss=True) if stage == "mae" else build_classifier(cfg, 14)
    if weights == "bf16":
        model.to(torch.bfloat16)
    seen, handles = _watch(model, monkeypatch)
    imgs = torch.randn(3, cfg.in_chans, cfg.img_size, cfg.img_size)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        if stage == "mae":
            loss = model(imgs)[0]
        else:
            loss = wsp_loss(model, imgs, torch.softmax(torch.randn(3, 14), -1))
    loss.backward()
    for h in handles:
        h.remove()
    n_norms = sum(isinstance(m, nn.LayerNorm) for m in model.modules())
    assert len({name for name, _ in seen if name.endswith(("norm", "norm1", "norm2"))}) == n_norms  # every norm ran
    n_linears = sum(isinstance(m, nn.Linear) for m in model.modules())
    head_in_loss = stage == "wsp" and kernels == "triton"
    assert sum(name == "linear" for name, _ in seen) == n_linears - head_in_loss  # every Linear ran, once
    assert sum(name == "head+loss" for name, _ in seen) == (stage == "wsp")
    promoted = [(name, dt) for name, dt in seen if dt != torch.bfloat16]
    assert not promoted, f"fp32 activations reach {promoted[:6]}"
    assert loss.dtype == torch.float32  # the loss itself is computed in fp32 inside its kernel
