"""MAE reconstruction loss with per-patch normalised pixel targets, fused.

Facts (official MAE ``forward_loss``): target per patch ``(t - mean) / sqrt(var + eps)`` with
``var`` UNBIASED (n - 1, torch's default) over the p*p*C values of the patch; per-patch MSE
``.mean(-1)``; then ``(loss * mask).sum() / mask.sum()`` so only removed patches (mask == 1)
count.

The fused kernels read each removed patch's target straight from the (B, C, H, W) image -- no
patchified (B, L, P) copy of the images, no normalised copy, no (B, L, P) squared error -- and
skip kept patches entirely (their loads are masked off, so they cost no memory traffic). The
forward writes one fp32 number per patch; the backward recomputes the target in registers and
writes d(pred) in one pass. The images are data: no gradient flows to them.
"""
from __future__ import annotations

from typing import Iterator

import torch
from maws_kernels._triton import tl, triton

from maws_kernels._backend import extension, resolve_backend, unit_last_stride
from maws_kernels._grid import check_grid
from maws_kernels._scenarios import CompileShapes, Scenario, Step, empty, op_impl
from maws_kernels.patch import _check_images, _patch_pixel_offsets, patchify

_IMPLEMENTED = ("triton", "cuda", "torch")
_NUM_WARPS = 4


@triton.jit
def _target_and_pred(
    pred_ptr, img_ptr, row, L, C, grid_w, s_pb, s_pl, s_b, s_c, s_h, s_w, w, eps,
    p: tl.constexpr, NORM_PIX: tl.constexpr, BLOCK_P: tl.constexpr,
):
    """Load patch ``row`` = b * L + l of pred and of the image, both fp32, target normalised."""
    b = row // L
    patch = row % L
    j = tl.arange(0, BLOCK_P)
    P = p * p * C
    # A patch with zero weight loads nothing: its lanes are masked off, so it moves no bytes.
    # (w is broadcast to a block first: the interpreter cannot AND a block with a scalar bool.)
    valid = (j < P) & ((tl.zeros([BLOCK_P], dtype=tl.float32) + w) != 0.0)
    src = img_ptr + _patch_pixel_offsets(b, patch, j, C, grid_w, s_b, s_c, s_h, s_w, p)
    t = tl.load(src, mask=valid, other=0.0).to(tl.float32)
    x = tl.load(pred_ptr + b * s_pb + patch * s_pl + j, mask=valid, other=0.0).to(tl.float32)
    if NORM_PIX:
        mean = tl.sum(t, axis=0) / P
        centred = tl.where(valid, t - mean, 0.0)
        var = tl.sum(centred * centred, axis=0) / (P - 1)  # unbiased, as torch.var and the official code
        t = centred / tl.sqrt_rn(var + eps)
    return x, t, j, P


@triton.jit
def _norm_pix_loss_fwd_kernel(
    pred_ptr,  # (B, L, P) row strides s_pb, s_pl, unit last stride; P = p * p * C
    img_ptr,  # (B, C, H, W) any strides
    mask_ptr,  # (B, L) fp32 contiguous: 1 = removed (counts), 0 = kept
    out_ptr,  # (B, L) fp32: mask * per-patch MSE
    L, C, grid_w,
    s_pb, s_pl,  # pred strides, in elements (MAE's pred is a view that drops the cls row)
    s_b, s_c, s_h, s_w,  # image strides, in elements
    eps,
    p: tl.constexpr, NORM_PIX: tl.constexpr, BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)  # one patch: row = b * L + l
    w = tl.load(mask_ptr + row)
    x, t, j, P = _target_and_pred(pred_ptr, img_ptr, row, L, C, grid_w, s_pb, s_pl, s_b, s_c, s_h, s_w, w, eps,
                                  p, NORM_PIX, BLOCK_P)
    d = x - t
    tl.store(out_ptr + row, w * (tl.sum(d * d, axis=0) / P))


@triton.jit
def _norm_pix_loss_bwd_kernel(
    gscale_ptr,  # (B, L) fp32, or one value when g_stride = 0: d(out) / d(rows[b, l]), read on device
    pred_ptr,  # (B, L, P) row strides s_pb, s_pl, unit last stride
    img_ptr,  # (B, C, H, W) any strides
    mask_ptr,  # (B, L) fp32 contiguous
    dpred_ptr,  # (B, L, P) contiguous, pred's dtype: written in full (zeros for kept patches)
    L, C, grid_w,
    s_pb, s_pl,
    s_b, s_c, s_h, s_w,
    eps, g_stride,
    p: tl.constexpr, NORM_PIX: tl.constexpr, BLOCK_P: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    w = tl.load(mask_ptr + row)
    x, t, j, P = _target_and_pred(pred_ptr, img_ptr, row, L, C, grid_w, s_pb, s_pl, s_b, s_c, s_h, s_w, w, eps,
                                  p, NORM_PIX, BLOCK_P)
    g = tl.load(gscale_ptr + row * g_stride) * w * 2.0 / P
    tl.store(dpred_ptr + row * P + j, (g * (x - t)).to(dpred_ptr.dtype.element_ty), mask=j < P)


def _check(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch_size: int) -> None:
    if pred.dim() != 3 or mask.shape != pred.shape[:2]:
        raise ValueError(f"pred must be (B, L, P) and mask (B, L); got {tuple(pred.shape)}, {tuple(mask.shape)}")
    if not pred.is_floating_point():
        raise ValueError(f"pred must be floating point, got {pred.dtype}")
    h, w = _check_images(images, patch_size)
    B, C = images.shape[:2]
    expect = (B, h * w, patch_size * patch_size * C)
    if tuple(pred.shape) != expect:
        raise ValueError(f"pred has shape {tuple(pred.shape)} but images {tuple(images.shape)} with patch "
                         f"{patch_size} give {expect}")
    if pred.device != images.device or mask.device != pred.device:
        raise ValueError(f"pred, images and mask must share a device; got {pred.device}, {images.device}, {mask.device}")


def _launch(kernel, pred, images, mask, p, norm_pix, eps, *front, out, g_stride=None):
    B, L, P = pred.shape
    C = images.shape[1]
    tail = () if g_stride is None else (g_stride,)
    if B * L:
        grid = check_grid("norm_pix_loss", (B * L,), f"pred {B} x {L} x {P}")
        kernel[grid](
            *front, pred, images, mask, out, L, C, images.shape[3] // p, pred.stride(0), pred.stride(1),
            *images.stride(), eps, *tail, p=p, NORM_PIX=norm_pix, BLOCK_P=triton.next_power_of_2(P),
            num_warps=_NUM_WARPS,
        )
    return out



@torch.library.custom_op("maws_kernels::norm_pix_loss_rows", mutates_args=())
def _rows_op(pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch_size: int, norm_pix: bool,
             eps: float, backend: str) -> torch.Tensor:
    """(B, L) fp32: mask * per-patch MSE."""
    if backend == "cuda":
        return extension().norm_pix_loss_fwd(pred, images, mask, patch_size, norm_pix, eps)
    out = torch.empty(mask.shape, device=pred.device, dtype=torch.float32)
    return _launch(_norm_pix_loss_fwd_kernel, unit_last_stride(pred), images, mask, patch_size, norm_pix, eps, out=out)


@_rows_op.register_fake
def _(pred, images, mask, patch_size, norm_pix, eps, backend):
    return pred.new_empty(mask.shape, dtype=torch.float32)


@torch.library.custom_op("maws_kernels::norm_pix_loss_backward", mutates_args=())
def _bwd_op(gscale: torch.Tensor, pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor, patch_size: int,
            norm_pix: bool, eps: float, backend: str) -> torch.Tensor:
    """d(pred) of ``sum(rows * gscale)``; gscale is fp32, (B, L) or one element for every row."""
    if backend == "cuda":
        return extension().norm_pix_loss_bwd(gscale, pred, images, mask, patch_size, norm_pix, eps)
    dpred = torch.empty(pred.shape, device=pred.device, dtype=pred.dtype)
    g_stride = 0 if gscale.numel() == 1 else 1
    return _launch(_norm_pix_loss_bwd_kernel, unit_last_stride(pred), images, mask, patch_size, norm_pix, eps,
                   gscale.contiguous(), out=dpred, g_stride=g_stride)


@_bwd_op.register_fake
def _(gscale, pred, images, mask, patch_size, norm_pix, eps, backend):
    return pred.new_empty(pred.shape)  # contiguous, as both real implementations


def _setup_context(ctx, inputs, output):
    pred, images, mask, patch_size, norm_pix, eps, backend = inputs
    ctx.save_for_backward(pred, images, mask)
    ctx.meta = (patch_size, norm_pix, eps, backend)


def _backward(ctx, grad_rows):
    pred, images, mask = ctx.saved_tensors
    p, norm_pix, eps, backend = ctx.meta
    # Per-row upstream gradients (B, L). For the public loss, rows.sum() / mask.sum(), they are one
    # scalar expanded (stride 0), passed as one value; the op is public (torch.ops.maws_kernels),
    # so any other use gets the general per-row path.
    if grad_rows.stride() == (0, 0):  # the scalar loss's gradient, expanded: pass its one value
        gscale = grad_rows.as_strided((1,), (1,)).float()
    else:
        gscale = grad_rows.float().contiguous()
    return _bwd_op(gscale, pred, images, mask, p, norm_pix, eps, backend), None, None, None, None, None, None


_rows_op.register_autograd(_backward, setup_context=_setup_context)


def norm_pix_loss(
    pred: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool = True,
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    """MAE loss over removed patches, targets read straight from the image.

    Args:
        pred: (B, L, p*p*C) predicted patches (fp32 / fp16 / bf16); the only input with a gradient.
        images: (B, C, H, W) the (normalised) input images, any strides and float dtype.
        mask: (B, L), 1 for removed patches, 0 for kept (any weights work: loss = sum(w * mse) / sum(w)).
        patch_size: patch side p.
        norm_pix: normalise each target patch by its mean and unbiased std.
        eps: added to the variance.
        backend: "triton" | "cuda" | "torch" | None (see maws_kernels._backend).

    Returns:
        0-d fp32 loss (pred's dtype on the "torch" backend, as the official code).
    """
    _check(pred, images, mask, patch_size)
    backend = resolve_backend("norm_pix_loss", backend, _IMPLEMENTED, pred.device)
    if backend == "torch":
        return norm_pix_loss_ref(pred, images.detach(), mask, patch_size, norm_pix=norm_pix, eps=eps)
    mask = mask.detach().to(torch.float32).contiguous()
    rows = _rows_op(pred, images.detach(), mask, patch_size, norm_pix, eps, backend)
    # Divide by the same mask.sum() the official code does; the reduction stays on the device.
    return rows.sum() / mask.sum()


def norm_pix_loss_ref(
    pred: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool = True,
    eps: float = 1e-6,
    upcast: bool = False,
) -> torch.Tensor:
    """Reference loss, the official formula verbatim.

    Args:
        pred: (B, L, p*p*C) predicted patches.
        images: (B, C, H, W) the (normalised) input images.
        mask: (B, L), 1 for removed patches, 0 for kept.
        patch_size: patch side p.
        norm_pix: normalise each target patch by its mean and unbiased std.
        eps: added to the variance.
        upcast: compute in fp32 whatever the input dtype.
    """
    if upcast:
        pred, images, mask = pred.float(), images.float(), mask.float()
    target = patchify(images, patch_size)  # (B, L, P)
    if norm_pix:
        mean = target.mean(dim=-1, keepdim=True)
        var = target.var(dim=-1, keepdim=True)  # unbiased, as the official code
        target = (target - mean) / (var + eps) ** 0.5
    loss = (pred - target) ** 2
    loss = loss.mean(dim=-1)  # (B, L) per-patch MSE
    return (loss * mask).sum() / mask.sum()


# --- compile scenarios: what maws_kernels.compile_check compiles (see _scenarios.py) ---------------
def _compile_run(dev: str, s: Step, norm_pix: bool, cls_view: bool) -> None:
    m, B = s.model, s.batch
    L, P = m.num_patches, m.patch * m.patch * m.chans
    img = empty((B, m.chans, m.img, m.img), s.data, dev)
    # cls_view: the official decoder's pred[:, 1:] (row stride (L + 1) * P, offset P)
    pred = empty((B, L + 1, P), s.act, dev).narrow(1, 1, L) if cls_view else empty((B, L, P), s.act, dev)
    mask = empty((B, L), torch.float32, dev)
    rows = op_impl(_rows_op)(pred, img, mask, m.patch, norm_pix, 1e-6, "triton")
    op_impl(_bwd_op)(rows, pred, img, mask, m.patch, norm_pix, 1e-6, "triton")  # gscale (B, L) fp32


def compile_scenarios(shapes: CompileShapes) -> Iterator[Scenario]:
    """The loss rows and their backward at each model's MAE shapes, with and without the per-patch
    normalisation; variants: the official decoder's pred[:, 1:] view."""
    for s in shapes.steps():
        for norm in (True, False):
            for view in (False, True) if shapes.variants else (False,):
                yield Scenario(f"{s.tag} {s.prec} norm_pix={norm}{' cls-view' if view else ''}", _compile_run,
                               (s, norm, view))
