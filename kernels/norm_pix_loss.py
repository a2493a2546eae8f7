"""MAE reconstruction loss with per-patch normalised pixel targets.

Facts (official MAE ``forward_loss``): target per patch ``(t - mean) / sqrt(var + eps)`` with
``var`` UNBIASED (n - 1, torch's default) over the p*p*C values of the patch; per-patch MSE
``.mean(-1)``; then ``(loss * mask).sum() / mask.sum()`` so only removed patches (mask == 1)
count.
"""
from __future__ import annotations

import torch

from maws_kernels._backend import resolve_backend
from maws_kernels.patch import patchify

_IMPLEMENTED = ("torch",)


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


def norm_pix_loss(
    pred: torch.Tensor,
    images: torch.Tensor,
    mask: torch.Tensor,
    patch_size: int,
    norm_pix: bool = True,
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    """MAE loss over removed patches; see :func:`norm_pix_loss_ref` for the arguments."""
    if pred.dim() != 3 or mask.shape != pred.shape[:2]:
        raise ValueError(f"pred must be (B, L, P) and mask (B, L); got {tuple(pred.shape)}, {tuple(mask.shape)}")
    resolve_backend("norm_pix_loss", backend, _IMPLEMENTED, pred.device)
    return norm_pix_loss_ref(pred, images, mask, patch_size, norm_pix=norm_pix, eps=eps)
