"""Under bf16 no activation is promoted to fp32 between blocks: every Linear and LayerNorm of an MAE and
a WSP training step sees bf16 inputs (CPU runs bf16, so this holds for the GPU default too), with the
weights in bf16 (the GPU default, parallel.param_dtype=bf16) or fp32 under autocast."""
import pytest
import torch
import torch.nn as nn

from maws_fast.config import model_preset
from maws_fast.models import build_classifier, build_mae
from maws_fast.train.objectives import wsp_loss


def _watch(model: nn.Module) -> tuple[list, list]:
    seen, handles = [], []
    for name, m in model.named_modules():
        if isinstance(m, (nn.Linear, nn.LayerNorm)):
            handles.append(m.register_forward_pre_hook(
                lambda mod, args, name=name: seen.append((name, args[0].dtype))))
    return seen, handles


@pytest.mark.parametrize("weights", ["bf16", "fp32"])
@pytest.mark.parametrize("stage", ["mae", "wsp"])
def test_every_linear_and_layernorm_input_is_bf16(seeded, stage, weights):
    cfg = model_preset("tiny")
    model = build_mae(cfg, norm_pix_loss=True) if stage == "mae" else build_classifier(cfg, 14)
    if weights == "bf16":
        model.to(torch.bfloat16)
    seen, handles = _watch(model)
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
    assert sum(name.endswith(("norm", "norm1", "norm2")) for name, _ in seen) == n_norms  # every norm ran
    promoted = [(name, dt) for name, dt in seen if dt != torch.bfloat16]
    assert not promoted, f"fp32 activations reach {promoted[:6]}"
    assert loss.dtype == torch.float32  # the loss itself is computed in fp32 inside its kernel
