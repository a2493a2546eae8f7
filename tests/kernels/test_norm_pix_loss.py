"""norm_pix_loss: Triton (interpreted on CPU) vs the official formula, loss and d(pred)."""
import pytest
import torch

import maws_kernels as mk
from tests.kernels.tolerance import LOWP, assert_rule

# The CPU tests here run Triton on CPU tensors (interpreted); the gpu-marked ones run compiled kernels.
pytestmark = pytest.mark.interpreter

# (B, C, H, W, p): B=1, patch 14 and 16, L = 6 / 15 / 3 (not powers of two), P = 16 .. 768
def _close_grad(a, b):
    """fp32 gradients: 1e-5 relative, plus 1e-6 of the largest entry for entries that cancel to ~0."""
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6 * b.abs().max().item())


SHAPES = [(1, 3, 28, 28, 14), (3, 3, 32, 48, 16), (2, 1, 20, 12, 4), (2, 3, 42, 14, 14)]


def _inputs(B, C, H, W, p, dtype, ratio=0.75):
    L, P = (H // p) * (W // p), p * p * C
    images = (torch.randn(B, C, H, W) * 2 + 0.5).to(dtype)
    pred = torch.randn(B, L, P).to(dtype).requires_grad_()
    mask = (torch.rand(B, L) < ratio).float()
    mask[:, 0] = 1.0  # at least one removed patch per sample, so mask.sum() > 0
    return pred, images, mask


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("norm_pix", [True, False])
def test_norm_pix_loss_fp32_matches_official_formula(seeded, shape, norm_pix):
    pred, images, mask = _inputs(*shape, torch.float32)
    loss = mk.norm_pix_loss(pred, images, mask, shape[-1], norm_pix=norm_pix, backend="triton")
    ref = mk.norm_pix_loss_ref(pred, images, mask, shape[-1], norm_pix=norm_pix)
    assert loss.dtype == torch.float32 and loss.dim() == 0
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)  # the bar: 1e-6 relative
    g = torch.rand(()) + 0.5  # a non-unit upstream gradient
    (gp,) = torch.autograd.grad(loss * g, pred)
    (gr,) = torch.autograd.grad(ref * g, pred)
    _close_grad(gp, gr)
    kept = mask == 0
    assert (gp[kept] == 0).all()  # kept patches get exactly zero gradient


@pytest.mark.parametrize("shape", SHAPES[1:3])
@pytest.mark.parametrize("dtype", LOWP)
def test_norm_pix_loss_low_precision_rule(seeded, shape, dtype):
    """fp16 / bf16 pred and images: error vs fp32 at most 2x the same-dtype torch formula's."""
    pred, images, mask = _inputs(*shape, dtype)
    p = shape[-1]
    loss = mk.norm_pix_loss(pred, images, mask, p, backend="triton")
    ref32 = mk.norm_pix_loss_ref(pred, images, mask, p, upcast=True)
    lowp = mk.norm_pix_loss_ref(pred, images, mask, p)
    assert_rule(loss, ref32, lowp, dtype, "loss")
    (gp,) = torch.autograd.grad(loss, pred)
    (g32,) = torch.autograd.grad(ref32, pred)
    (glow,) = torch.autograd.grad(lowp, pred)
    assert gp.dtype == dtype
    assert_rule(gp, g32, glow, dtype, "d(pred)", atol=1e-4)


def test_norm_pix_loss_weighted_mask_and_strided_images(seeded):
    pred, images, _ = _inputs(2, 3, 32, 48, 16, torch.float32)
    images = images.to(memory_format=torch.channels_last)
    mask = torch.rand(2, 6) * (torch.rand(2, 6) < 0.5)  # weights, not just 0/1
    mask[0, 0] = 0.7
    loss = mk.norm_pix_loss(pred, images, mask, 16, backend="triton")
    ref = mk.norm_pix_loss_ref(pred, images, mask, 16)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    _close_grad(torch.autograd.grad(loss, pred)[0], torch.autograd.grad(ref, pred)[0])


def test_norm_pix_loss_pred_view_without_cls_row(seeded):
    """MAE's pred is decoder_pred(x)[:, 1:]: a strided view, read in place."""
    _, images, mask = _inputs(2, 3, 32, 48, 16, torch.float32)
    full = torch.randn(2, 7, 768, requires_grad=True)
    pred = full[:, 1:]
    assert not pred.is_contiguous()
    loss = mk.norm_pix_loss(pred, images, mask, 16, backend="triton")
    ref = mk.norm_pix_loss_ref(pred, images, mask, 16)
    torch.testing.assert_close(loss, ref, rtol=1e-6, atol=0)
    _close_grad(torch.autograd.grad(loss, full)[0], torch.autograd.grad(ref, full)[0])


def test_rows_op_gradient_with_a_different_upstream_per_patch(seeded):
    """The custom op is public (torch.ops.maws_kernels): any use of its (B, L) rows differentiates right."""
    pred, images, mask = _inputs(2, 3, 32, 48, 16, torch.float32)
    rows = torch.ops.maws_kernels.norm_pix_loss_rows(pred, images, mask, 16, True, 1e-6, "triton")
    t = mk.patchify(images, 16)
    t = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True) + 1e-6) ** 0.5
    ref_rows = ((pred - t) ** 2).mean(-1) * mask
    torch.testing.assert_close(rows, ref_rows, rtol=1e-6, atol=1e-7)
    w = torch.rand(2, 6) + 0.1
    _close_grad(torch.autograd.grad((rows * w).sum(), pred)[0], torch.autograd.grad((ref_rows * w).sum(), pred)[0])


def test_norm_pix_loss_uses_unbiased_variance(seeded):
    """A biased-variance target gives a measurably different loss: the kernel must not be it."""
    pred, images, mask = _inputs(1, 1, 8, 8, 2, torch.float32)  # P = 4: n vs n-1 differs by 25%
    loss = mk.norm_pix_loss(pred, images, mask, 2, backend="triton")
    t = mk.patchify(images, 2)
    biased = (t - t.mean(-1, keepdim=True)) / (t.var(-1, unbiased=False, keepdim=True) + 1e-6) ** 0.5
    wrong = (((pred - biased) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert abs(loss.item() - wrong.item()) > 1e-3
    torch.testing.assert_close(loss, mk.norm_pix_loss_ref(pred, images, mask, 2), rtol=1e-6, atol=0)


def test_norm_pix_loss_compiles_without_graph_break(seeded):
    pred, images, mask = _inputs(2, 3, 16, 16, 4, torch.float32)
    f = torch.compile(lambda a, b, c: mk.norm_pix_loss(a, b, c, 4, backend="triton") * 2.0,
                      backend="aot_eager", fullgraph=True)
    y = f(pred, images, mask)
    r = mk.norm_pix_loss_ref(pred, images, mask, 4) * 2.0
    torch.testing.assert_close(y, r, rtol=1e-6, atol=0)
    _close_grad(torch.autograd.grad(y, pred)[0], torch.autograd.grad(r, pred)[0])


def test_norm_pix_loss_rejects_bad_inputs():
    pred, images, mask = _inputs(2, 3, 16, 16, 4, torch.float32)
    with pytest.raises(ValueError, match="give"):
        mk.norm_pix_loss(pred[:, :, :10], images, mask, 4, backend="triton")
    with pytest.raises(ValueError, match="mask"):
        mk.norm_pix_loss(pred, images, mask[:, :3], 4, backend="triton")
    with pytest.raises(mk.BackendUnavailableError):
        mk.norm_pix_loss(pred, images, mask, 4, backend="cuda")
    for backend in ("triton", "torch"):  # one clear message on every backend, not a torch internal
        with pytest.raises(ValueError, match="floating point"):
            mk.norm_pix_loss(pred, images.to(torch.uint8), mask, 4, backend=backend)
        with pytest.raises(ValueError, match="share a device"):
            mk.norm_pix_loss(pred, images.to("meta"), mask, 4, backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
@pytest.mark.parametrize("model", [(224, 16), (224, 14)])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_norm_pix_loss_gpu(backend, model, dtype):
    if backend == "cuda" and "cuda" not in mk.available_backends("norm_pix_loss", ("cuda",), "cuda"):
        pytest.skip("maws_kernels._C is not built (pip install --no-build-isolation -e ./kernels on a CUDA machine)")
    img, p = model
    L = (img // p) ** 2
    images = torch.randn(16, 3, img, img, device="cuda").to(dtype)
    pred = torch.randn(16, L, p * p * 3, device="cuda").to(dtype).requires_grad_()
    mask = (torch.rand(16, L, device="cuda") < 0.75).float()
    loss = mk.norm_pix_loss(pred, images, mask, p, backend=backend)
    ref32 = mk.norm_pix_loss_ref(pred, images, mask, p, upcast=True)
    (gp,) = torch.autograd.grad(loss, pred)
    (g32,) = torch.autograd.grad(ref32, pred)
    if dtype == torch.float32:
        torch.testing.assert_close(loss, ref32, rtol=1e-6, atol=0)
        _close_grad(gp, g32)
    else:
        lowp = mk.norm_pix_loss_ref(pred, images, mask, p)
        assert_rule(loss, ref32, lowp, dtype, "loss")
        assert_rule(gp, g32, torch.autograd.grad(lowp, pred)[0], dtype, "d(pred)", atol=1e-5)
