"""Batched image transforms on CPU tensors.

The random ones take an explicit ``torch.Generator`` and draw a fixed number of values per call,
so a batch's augmentation is a pure function of the generator's seed (what lets the loader resume
bit-identically). Resampling uses one ``grid_sample`` for the whole batch instead of a per-image
crop + resize.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

import numpy as np
import torch
import torch.nn.functional as F

from maws_fast.errors import DataError

_ATTEMPTS = 10  # as torchvision's RandomResizedCrop.get_params


def sample_crop_boxes(
    batch: int,
    height: int | torch.Tensor,
    width: int | torch.Tensor,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
) -> torch.Tensor:
    """Samples RandomResizedCrop boxes for a batch, as torchvision's ``get_params`` does per image.

    For each image: up to 10 attempts of area fraction ~ U(scale) and log aspect ratio ~
    U(log ratio), with ``w = round(sqrt(area * r))``, ``h = round(sqrt(area / r))``; the first
    attempt that fits gets a uniformly random top-left corner. If none fits, a central crop of
    the whole image with its ratio clamped to ``ratio``. All 10 attempts are drawn for every image
    (vectorised), so the number of draws is fixed; the distribution is torchvision's, the exact
    random stream is not.

    Args:
        batch: number of boxes B.
        height: image height H, or int ``(B,)`` heights of images of different sizes.
        width: image width W, or int ``(B,)`` widths.
        generator: source of randomness.
        scale: range of the crop's area as a fraction of the image's.
        ratio: range of the crop's aspect ratio w / h.

    Returns:
        int64 ``(B, 4)`` boxes ``(top, left, h, w)`` in pixels.
    """
    u_area = torch.rand(batch, _ATTEMPTS, generator=generator, dtype=torch.float64)
    u_ratio = torch.rand(batch, _ATTEMPTS, generator=generator, dtype=torch.float64)
    u_pos = torch.rand(batch, 2, generator=generator, dtype=torch.float64)
    # The arithmetic runs in numpy: torch's per-op overhead on these (B, 10) tensors can reach
    # milliseconds when its thread pool competes with loader threads, and this runs per batch.
    hh = np.broadcast_to(np.asarray(height, dtype=np.int64).reshape(-1), (batch,))  # (B,)
    ww = np.broadcast_to(np.asarray(width, dtype=np.int64).reshape(-1), (batch,))  # (B,)
    area = (hh * ww).astype(np.float64)[:, None]  # (B, 1)
    log_lo, log_hi = math.log(ratio[0]), math.log(ratio[1])
    target_area = area * (scale[0] + (scale[1] - scale[0]) * u_area.numpy())  # (B, A)
    aspect = np.exp(log_lo + (log_hi - log_lo) * u_ratio.numpy())  # (B, A)
    # np.round rounds half to even, like Python's round() in torchvision.
    w = np.round(np.sqrt(target_area * aspect)).astype(np.int64)  # (B, A)
    h = np.round(np.sqrt(target_area / aspect)).astype(np.int64)  # (B, A)
    fits = (w > 0) & (w <= ww[:, None]) & (h > 0) & (h <= hh[:, None])  # (B, A)
    ok = fits.any(axis=1)  # (B,)
    first = fits.argmax(axis=1)[:, None]  # (B, 1): first True attempt
    w = np.take_along_axis(w, first, 1)[:, 0]  # (B,)
    h = np.take_along_axis(h, first, 1)[:, 0]  # (B,)
    u = u_pos.numpy()
    # randint(0, H - h + 1) via floor(u * (H - h + 1)); min() guards u's rounding to 1.0.
    top = np.minimum(np.floor(u[:, 0] * (hh - h + 1)).astype(np.int64), hh - h)
    left = np.minimum(np.floor(u[:, 1] * (ww - w + 1)).astype(np.int64), ww - w)

    # Fallback: central crop with the ratio clamped into range (per distinct image size).
    sizes = list(zip(hh.tolist(), ww.tolist()))
    by_size = {hw: _fallback_box(hw[0], hw[1], ratio) for hw in set(sizes)}
    fallback = np.array([by_size[hw] for hw in sizes], dtype=np.int64).reshape(batch, 4)  # (B, 4)
    boxes = np.stack([top, left, h, w], axis=1)  # (B, 4)
    return torch.from_numpy(np.where(ok[:, None], boxes, fallback))


def _fallback_box(height: int, width: int, ratio: tuple[float, float]) -> tuple[int, int, int, int]:
    in_ratio = width / height
    if in_ratio < min(ratio):
        fw, fh = width, int(round(width / min(ratio)))
    elif in_ratio > max(ratio):
        fw, fh = int(round(height * max(ratio))), height
    else:
        fw, fh = width, height
    return (height - fh) // 2, (width - fw) // 2, fh, fw


def boxes_to_theta(
    boxes: torch.Tensor, height: int, width: int, flip: torch.Tensor | None = None
) -> torch.Tensor:
    """Affine matrices for ``F.affine_grid`` that map the output onto pixel boxes of the input.

    With ``align_corners=False`` normalised coordinate -1/+1 is the outer edge of the first/last
    pixel, so the box ``[left, left + w)`` (pixel edges) spans ``(2 * left) / W - 1`` to
    ``2 * (left + w) / W - 1``: centre ``(2 * left + w) / W - 1``, half-width ``w / W``. Output
    pixel centres then land exactly where an ``interpolate`` of the crop would sample.

    Args:
        boxes: int ``(B, 4)`` boxes ``(top, left, h, w)``.
        height: input height H.
        width: input width W.
        flip: optional bool ``(B,)``; True mirrors that sample horizontally (negated x scale).

    Returns:
        float32 ``(B, 2, 3)``.
    """
    b = boxes.to(torch.float64)
    top, left, h, w = b.unbind(dim=1)  # each (B,)
    sx = w / width
    sy = h / height
    if flip is not None:
        sx = torch.where(flip, -sx, sx)
    zero = torch.zeros_like(sx)
    theta = torch.stack(
        [
            torch.stack([sx, zero, (2 * left + w) / width - 1], dim=1),
            torch.stack([zero, sy, (2 * top + h) / height - 1], dim=1),
        ],
        dim=1,
    )  # (B, 2, 3)
    return theta.to(torch.float32)


def random_resized_crop_flip(
    x: torch.Tensor,
    out_size: int,
    generator: torch.Generator,
    scale: tuple[float, float] = (0.2, 1.0),
    ratio: tuple[float, float] = (3 / 4, 4 / 3),
    flip_p: float = 0.5,
) -> torch.Tensor:
    """RandomResizedCrop + RandomHorizontalFlip for a whole batch, in one bicubic ``grid_sample``.

    Args:
        x: float32 ``(B, C, H, W)``.
        out_size: side of the square output.
        generator: source of randomness (boxes first, then flips).
        scale: range of the crop's area fraction.
        ratio: range of the crop's aspect ratio w / h.
        flip_p: probability of a horizontal flip per sample.

    Returns:
        float32 ``(B, C, out_size, out_size)``.
    """
    if x.ndim != 4 or not x.is_floating_point():
        raise DataError(
            f"random_resized_crop_flip needs a float (B, C, H, W) batch, got {x.dtype} "
            f"{tuple(x.shape)}; normalise uint8 images first."
        )
    bsz, _, height, width = x.shape
    boxes = sample_crop_boxes(bsz, height, width, generator, scale, ratio)  # (B, 4)
    flip = torch.rand(bsz, generator=generator) < flip_p  # (B,)
    theta = boxes_to_theta(boxes, height, width, flip).to(x.dtype)  # (B, 2, 3)
    grid = F.affine_grid(theta, [bsz, x.shape[1], out_size, out_size], align_corners=False)
    return F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)


def center_crop_resize(x: torch.Tensor, out_size: int, crop_frac: float = 1.0) -> torch.Tensor:
    """Eval transform: resize the shorter side to ``round(out_size / crop_frac)``, then centre crop.

    With the default ``crop_frac=1`` and square inputs already at ``out_size`` this is the
    identity (returns a view of ``x``).

    Args:
        x: float ``(B, C, H, W)``.
        out_size: side of the square output.
        crop_frac: fraction of the resized shorter side kept by the crop (e.g. 0.875).

    Returns:
        ``(B, C, out_size, out_size)``.
    """
    _, _, height, width = x.shape
    short = round(out_size / crop_frac)
    if min(height, width) != short:
        if height <= width:
            size = (short, max(short, round(width * short / height)))
        else:
            size = (max(short, round(height * short / width)), short)
        # antialias so that downscaling does not alias, as torchvision's Resize does.
        x = F.interpolate(x, size=size, mode="bicubic", align_corners=False, antialias=True)
        height, width = size
    top = (height - out_size) // 2
    left = (width - out_size) // 2
    return x[:, :, top : top + out_size, left : left + out_size]


def normalize(
    x: torch.Tensor, mean: float | Sequence[float], std: float | Sequence[float]
) -> torch.Tensor:
    """Scales uint8 images to [0, 1] and standardises them per channel.

    Args:
        x: uint8 ``(B, H, W)`` (one channel) or ``(B, C, H, W)``.
        mean: per-channel mean of the [0, 1] pixels: a float or C floats.
        std: per-channel standard deviation: a float or C floats.

    Returns:
        float32 ``(B, C, H, W)`` equal to ``(x / 255 - mean) / std``.
    """
    if x.dtype != torch.uint8 or x.ndim not in (3, 4):
        raise DataError(
            f"normalize needs uint8 images (B, H, W) or (B, C, H, W), got {x.dtype} "
            f"{tuple(x.shape)}."
        )
    if x.ndim == 3:
        x = x.unsqueeze(1)  # (B, 1, H, W)
    c = x.shape[1]
    stats = []
    for name, val in (("mean", mean), ("std", std)):
        t = torch.as_tensor(val, dtype=torch.float32).reshape(-1)
        if t.numel() not in (1, c):
            raise DataError(
                f"normalize got {t.numel()} {name} values for images with {c} channels; give "
                f"one value or {c}."
            )
        stats.append(t.expand(c).reshape(1, c, 1, 1))
    m, s = stats
    if bool((s <= 0).any()):
        raise DataError(f"normalize needs std > 0, got {std}.")
    # Fold /255 into the affine: (x / 255 - m) / s = x * (1 / (255 s)) - m / s.
    return torch.addcmul(-m / s, x.to(torch.float32), 1.0 / (255.0 * s))
