"""GPU tier for the models (skipped without CUDA): the same MAE / WSP steps on CUDA, fp32 and
bf16 autocast, against the CPU fp32 result."""
import pytest
import torch

from maws_fast.config import model_preset
from maws_fast.models import build_classifier, build_mae

pytestmark = pytest.mark.gpu


@pytest.mark.parametrize("attn", ["sdpa", "manual"])
def test_mae_forward_backward_cuda_matches_cpu(attn):
    cfg = model_preset("tiny", attn_backend=attn)
    torch.manual_seed(0)
    cpu = build_mae(cfg)
    gpu = build_mae(cfg).cuda()
    gpu.load_state_dict(cpu.state_dict())
    x = torch.randn(8, 1, 28, 28)
    noise = torch.rand(8, cfg.num_patches)
    loss_c, pred_c, _ = cpu(x, noise=noise)
    loss_g, pred_g, _ = gpu(x.cuda(), noise=noise.cuda())
    torch.testing.assert_close(loss_g.cpu(), loss_c, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(pred_g.cpu(), pred_c, rtol=1e-3, atol=1e-3)
    loss_c.backward()
    loss_g.backward()
    for (n, a), (_, b) in zip(cpu.named_parameters(), gpu.named_parameters()):
        if a.grad is not None:
            torch.testing.assert_close(b.grad.cpu(), a.grad, rtol=1e-3, atol=1e-4, msg=n)


def test_bf16_autocast_classifier_close_to_fp32():
    torch.manual_seed(0)
    model = build_classifier(model_preset("vit_b16", depth=2), num_classes=1000).cuda()
    x = torch.randn(4, 3, 224, 224, device="cuda")
    with torch.no_grad():
        ref = model(x)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            low = model(x)
    err = (low.float() - ref).abs().max().item()
    assert err < 0.05 * ref.abs().max().item() + 1e-3
