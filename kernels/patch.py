"""Patch layout ops: patchify / unpatchify and the masked patch gather.

Layout fact (official MAE): a patch is flattened in (row p, col q, channel c) order, channel
last -- NOT the (c, p, q) order of the Conv2d patch-embed weight. Every pixel-space target,
prediction and fused kernel in this package uses that order.
"""
from __future__ import annotations

import torch

from maws_kernels._backend import resolve_backend

_IMPLEMENTED = ("torch",)


def _check_images(images: torch.Tensor, patch_size: int) -> tuple[int, int]:
    if images.dim() != 4:
        raise ValueError(f"expected images of shape (B, C, H, W), got {tuple(images.shape)}")
    _, _, H, W = images.shape
    if H % patch_size or W % patch_size:
        raise ValueError(f"image size {H}x{W} is not divisible by patch_size {patch_size}")
    return H // patch_size, W // patch_size


def patchify(images: torch.Tensor, patch_size: int) -> torch.Tensor:
    """(B, C, H, W) -> (B, L, p*p*C), patches in raster order, (p, q, c) inside a patch."""
    h, w = _check_images(images, patch_size)
    B, C = images.shape[:2]
    p = patch_size
    x = images.reshape(B, C, h, p, w, p)
    x = torch.einsum("nchpwq->nhwpqc", x)  # (B, h, w, p, p, C)
    return x.reshape(B, h * w, p * p * C)


def unpatchify(x: torch.Tensor, patch_size: int, channels: int, grid: tuple[int, int] | None = None) -> torch.Tensor:
    """Inverse of :func:`patchify`: (B, L, p*p*C) -> (B, C, h*p, w*p). ``grid`` defaults to square."""
    B, L, _ = x.shape
    p = patch_size
    if grid is None:
        h = w = int(round(L**0.5))
    else:
        h, w = grid
    if h * w != L or x.shape[-1] != p * p * channels:
        raise ValueError(f"cannot unpatchify {tuple(x.shape)} with patch {p}, {channels} channels, grid {(h, w)}")
    x = x.reshape(B, h, w, p, p, channels)
    x = torch.einsum("nhwpqc->nchpwq", x)
    return x.reshape(B, channels, h * p, w * p)


def masked_patchify_ref(images: torch.Tensor, ids_keep: torch.Tensor, patch_size: int) -> torch.Tensor:
    """Reference: patchify every patch, then gather the kept ones. (B,C,H,W), (B,K) -> (B,K,p*p*C)."""
    patches = patchify(images, patch_size)  # (B, L, P)
    idx = ids_keep.unsqueeze(-1).expand(-1, -1, patches.shape[-1])
    return torch.gather(patches, 1, idx)


def masked_patchify(
    images: torch.Tensor, ids_keep: torch.Tensor, patch_size: int, backend: str | None = None
) -> torch.Tensor:
    """Patchify + gather of the kept patches: (B,C,H,W), (B,K) int64 -> (B,K,p*p*C).

    Args:
        images: (B, C, H, W) image batch.
        ids_keep: (B, K) int64 indices of kept patches in raster order.
        patch_size: patch side p.
        backend: "triton" | "cuda" | "torch" | None (see maws_kernels._backend).
    """
    _check_images(images, patch_size)
    resolve_backend("masked_patchify", backend, _IMPLEMENTED, images.device)
    return masked_patchify_ref(images, ids_keep, patch_size)
