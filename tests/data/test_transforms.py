"""Batched transforms: exact box mapping of the affine grid, crop sampling, eval, normalize."""

from __future__ import annotations

import math
import random

import pytest
import torch
import torch.nn.functional as F

from maws_fast.data.transforms import (
    boxes_to_theta,
    center_crop_resize,
    normalize,
    random_resized_crop_flip,
    sample_crop_boxes,
)
from maws_fast.errors import DataError


def _gen(seed: int = 0) -> torch.Generator:
    return torch.Generator().manual_seed(seed)


def test_full_box_is_identity():
    x = torch.rand(4, 3, 28, 28)
    y = random_resized_crop_flip(x, 28, _gen(), scale=(1, 1), ratio=(1, 1), flip_p=0.0)
    assert y.shape == x.shape
    assert torch.allclose(y, x, atol=1e-5, rtol=0)


def test_full_box_flip_is_mirror():
    x = torch.rand(4, 3, 28, 28)
    y = random_resized_crop_flip(x, 28, _gen(), scale=(1, 1), ratio=(1, 1), flip_p=1.0)
    assert torch.allclose(y, x.flip(-1), atol=1e-5, rtol=0)


def test_known_box_matches_interpolate():
    # Top-left quadrant upsampled 2x must sample where interpolate(crop) samples. Near the
    # crop's right/bottom edge grid_sample sees real neighbours where interpolate replicates
    # the edge, so only the interior (all 4 bicubic taps inside the crop) must agree.
    x = torch.rand(2, 3, 28, 28)
    boxes = torch.tensor([[0, 0, 14, 14]] * 2)
    grid = F.affine_grid(boxes_to_theta(boxes, 28, 28), [2, 3, 28, 28], align_corners=False)
    y = F.grid_sample(x, grid, mode="bicubic", padding_mode="border", align_corners=False)
    ref = F.interpolate(x[:, :, :14, :14], scale_factor=2, mode="bicubic", align_corners=False)
    assert torch.allclose(y[..., :24, :24], ref[..., :24, :24], atol=1e-5, rtol=0)


def test_non_square_box_and_flip_match_interpolate():
    x = torch.rand(1, 1, 20, 30)
    boxes = torch.tensor([[4, 6, 10, 15]])  # top, left, h, w
    theta = boxes_to_theta(boxes, 20, 30, flip=torch.tensor([True]))
    y = F.grid_sample(
        x,
        F.affine_grid(theta, [1, 1, 20, 30], align_corners=False),
        mode="bicubic",
        padding_mode="border",
        align_corners=False,
    )
    crop = x[:, :, 4:14, 6:21]
    ref = F.interpolate(crop, size=(20, 30), mode="bicubic", align_corners=False).flip(-1)
    # Exact in the interior: away from every crop edge by the bicubic reach (2 source px).
    assert torch.allclose(y[..., 4:-4, 4:-4], ref[..., 4:-4, 4:-4], atol=1e-5, rtol=0)


def _get_params_reference(h: int, w: int, scale, ratio, rng: random.Random):
    """torchvision's RandomResizedCrop.get_params, transcribed with Python's random."""
    area = h * w
    log_ratio = (math.log(ratio[0]), math.log(ratio[1]))
    for _ in range(10):
        target_area = area * rng.uniform(*scale)
        aspect = math.exp(rng.uniform(*log_ratio))
        cw = int(round(math.sqrt(target_area * aspect)))
        ch = int(round(math.sqrt(target_area / aspect)))
        if 0 < cw <= w and 0 < ch <= h:
            return rng.randint(0, h - ch), rng.randint(0, w - cw), ch, cw
    in_ratio = w / h
    if in_ratio < min(ratio):
        cw, ch = w, int(round(w / min(ratio)))
    elif in_ratio > max(ratio):
        ch, cw = h, int(round(h * max(ratio)))
    else:
        cw, ch = w, h
    return (h - ch) // 2, (w - cw) // 2, ch, cw


@pytest.mark.parametrize(
    "h,w,scale,ratio",
    [(28, 28, (0.2, 1.0), (3 / 4, 4 / 3)), (20, 40, (0.5, 1.0), (3 / 4, 4 / 3)),
     (28, 28, (0.9, 1.0), (0.1, 10.0))],
)  # fmt: skip
def test_box_distribution_matches_torchvision(h, w, scale, ratio):
    n = 8000
    ours = sample_crop_boxes(n, h, w, _gen(1), scale, ratio)
    assert bool((ours[:, 0] >= 0).all() and (ours[:, 1] >= 0).all())
    assert bool((ours[:, 0] + ours[:, 2] <= h).all() and (ours[:, 1] + ours[:, 3] <= w).all())
    rng = random.Random(0)
    ref = torch.tensor([_get_params_reference(h, w, scale, ratio, rng) for _ in range(n)])
    # Means of (top, left, h, w) agree within a few standard errors.
    se = (ours.double().std(0) ** 2 / n + ref.double().std(0) ** 2 / n).sqrt() + 1e-9
    z = (ours.double().mean(0) - ref.double().mean(0)).abs() / se
    assert bool((z < 5).all()), z


def test_fallback_is_central_clamped_crop():
    # No 10-attempt box fits a 4x40 image with ratio in [1, 1] and area >= 0.5: fallback.
    boxes = sample_crop_boxes(5, 4, 40, _gen(), scale=(0.5, 1.0), ratio=(1.0, 1.0))
    assert torch.equal(boxes, torch.tensor([[0, 18, 4, 4]] * 5))


def test_augment_deterministic_and_varied():
    x = torch.rand(16, 1, 28, 28)
    a = random_resized_crop_flip(x, 24, _gen(5))
    b = random_resized_crop_flip(x, 24, _gen(5))
    c = random_resized_crop_flip(x, 24, _gen(6))
    assert a.shape == (16, 1, 24, 24)
    assert torch.equal(a, b) and not torch.equal(a, c)


def test_center_crop_resize():
    x = torch.rand(2, 3, 28, 28)
    assert torch.equal(center_crop_resize(x, 28), x)
    # crop_frac 20/28 keeps the 28 side (no resize) and crops the centre 20x20.
    assert torch.equal(center_crop_resize(x, 20, crop_frac=20 / 28), x[:, :, 4:24, 4:24])
    ref = F.interpolate(x, size=(20, 20), mode="bicubic", align_corners=False, antialias=True)
    assert torch.allclose(center_crop_resize(x, 20), ref)
    y = center_crop_resize(torch.rand(2, 3, 30, 60), 16, crop_frac=0.8)
    assert y.shape == (2, 3, 16, 16)


def test_normalize():
    x = torch.randint(0, 256, (3, 28, 28), dtype=torch.uint8)
    y = normalize(x, 0.5, 0.25)
    assert y.shape == (3, 1, 28, 28) and y.dtype == torch.float32
    assert torch.allclose(y[:, 0], (x.float() / 255 - 0.5) / 0.25, atol=1e-5)
    x3 = torch.randint(0, 256, (2, 3, 4, 4), dtype=torch.uint8)
    mean, std = [0.1, 0.2, 0.3], [0.5, 0.6, 0.7]
    ref = (x3.float() / 255 - torch.tensor(mean)[:, None, None]) / torch.tensor(std)[:, None, None]
    assert torch.allclose(normalize(x3, mean, std), ref, atol=1e-5)
    with pytest.raises(DataError, match="2 mean values"):
        normalize(x3, [0.1, 0.2], std)
    with pytest.raises(DataError, match="uint8"):
        normalize(x3.float(), mean, std)
