"""Mixup / CutMix with label smoothing folded into soft targets, as timm's ``Mixup`` in batch mode.

Per batch: with probability ``prob`` the batch is mixed, by CutMix with probability
``switch_prob`` (when both alphas are > 0) else by Mixup; ``lam ~ Beta(alpha, alpha)``. Mixup blends
each image with the batch reversed (``x.flip(0)``); CutMix pastes a box of the reversed batch
(side ``sqrt(1 - lam)`` of the image's, centre uniform, clipped at the borders) and corrects
``lam`` to the pasted area. Targets: ``lam * smooth(y) + (1 - lam) * smooth(y.flip(0))`` with
``smooth`` = one-hot at ``1 - smoothing + smoothing / C``, ``smoothing / C`` elsewhere; each row
sums to 1. The draws are timm's, in timm's order, from a ``numpy.random.RandomState`` the caller
seeds per step (so a resumed run mixes the same way; seeded alike, timm's global-RNG Mixup gives
the same numbers, which the tests check).

With several data-parallel ranks each mixes its own share of the batch (as timm under DDP); an
odd share is allowed (its middle image pairs with itself, unchanged).
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch


def smooth_one_hot(labels: torch.Tensor, num_classes: int, smoothing: float = 0.0) -> torch.Tensor:
    """(B,) int labels -> (B, C) fp32 targets: ``1 - smoothing + smoothing / C`` at the label,
    ``smoothing / C`` elsewhere (timm's ``one_hot`` with on / off values)."""
    off = smoothing / num_classes
    out = torch.full((labels.shape[0], num_classes), off, device=labels.device, dtype=torch.float32)
    return out.scatter_(1, labels.long().unsqueeze(1), 1.0 - smoothing + off)


@dataclass(frozen=True)
class MixBox:
    """What one batch's draw decided: ``lam`` and, for CutMix, the pasted box (rows, cols)."""

    lam: float
    box: tuple[int, int, int, int] | None = None  # (y0, y1, x0, x1), half-open


@dataclass(frozen=True)
class Mixup:
    """timm's ``Mixup(mixup_alpha, cutmix_alpha, prob, switch_prob, mode="batch", label_smoothing)``.

    Args:
        num_classes: C of the targets.
        mixup_alpha: Beta parameter of Mixup's lam (0 disables Mixup).
        cutmix_alpha: Beta parameter of CutMix's lam (0 disables CutMix).
        prob: probability that a batch is mixed at all.
        switch_prob: probability of CutMix rather than Mixup when both are enabled.
        label_smoothing: folded into the targets, mixed or not.
    """

    num_classes: int
    mixup_alpha: float = 0.8
    cutmix_alpha: float = 1.0
    prob: float = 1.0
    switch_prob: float = 0.5
    label_smoothing: float = 0.1

    def __post_init__(self):
        if self.num_classes < 1:
            raise ValueError(f"mixup needs num_classes >= 1, got {self.num_classes}")
        if self.mixup_alpha < 0 or self.cutmix_alpha < 0:
            raise ValueError("mixup / cutmix alphas must be >= 0")
        if not (0 <= self.prob <= 1 and 0 <= self.switch_prob <= 1 and 0 <= self.label_smoothing < 1):
            raise ValueError("mixup prob and switch_prob must be in [0, 1], label_smoothing in [0, 1)")

    @property
    def mixes(self) -> bool:
        return self.prob > 0 and (self.mixup_alpha > 0 or self.cutmix_alpha > 0)

    def draw(self, rng: np.random.RandomState, height: int, width: int) -> MixBox:
        """One batch's lam and box, drawn in timm's order (mix?, switch?, beta, centre row, centre col)."""
        if not self.mixes or rng.rand() >= self.prob:
            return MixBox(1.0)
        if self.mixup_alpha > 0 and self.cutmix_alpha > 0:
            cutmix = bool(rng.rand() < self.switch_prob)
            lam = float(rng.beta(self.cutmix_alpha, self.cutmix_alpha) if cutmix
                        else rng.beta(self.mixup_alpha, self.mixup_alpha))
        elif self.mixup_alpha > 0:
            cutmix, lam = False, float(rng.beta(self.mixup_alpha, self.mixup_alpha))
        else:
            cutmix, lam = True, float(rng.beta(self.cutmix_alpha, self.cutmix_alpha))
        if not cutmix:
            return MixBox(lam)
        ratio = np.sqrt(1.0 - lam)
        cut_h, cut_w = int(height * ratio), int(width * ratio)
        cy, cx = int(rng.randint(0, height)), int(rng.randint(0, width))
        # (cut + 1) // 2 above the centre: a box of exactly cut pixels before clipping (timm >= 0.9;
        # timm 0.3.2, which the official MAE pinned, used cut // 2 and lost a pixel on odd cuts)
        y0, y1 = int(np.clip(cy - cut_h // 2, 0, height)), int(np.clip(cy + (cut_h + 1) // 2, 0, height))
        x0, x1 = int(np.clip(cx - cut_w // 2, 0, width)), int(np.clip(cx + (cut_w + 1) // 2, 0, width))
        lam = 1.0 - (y1 - y0) * (x1 - x0) / float(height * width)  # the area actually pasted
        return MixBox(lam, (y0, y1, x0, x1))

    def __call__(self, images: torch.Tensor, labels: torch.Tensor,
                 rng: np.random.RandomState) -> tuple[torch.Tensor, torch.Tensor]:
        """(B, C, H, W) images and (B,) labels -> (mixed images, (B, num_classes) fp32 soft targets).
        The input images are not modified."""
        mix = self.draw(rng, images.shape[-2], images.shape[-1])
        targets = smooth_one_hot(labels, self.num_classes, self.label_smoothing)
        if mix.lam == 1.0:
            return images, targets
        targets = targets * mix.lam + targets.flip(0) * (1.0 - mix.lam)
        if mix.box is None:
            return images * mix.lam + images.flip(0) * (1.0 - mix.lam), targets
        y0, y1, x0, x1 = mix.box
        out = images.clone()
        out[..., y0:y1, x0:x1] = images.flip(0)[..., y0:y1, x0:x1]
        return out, targets
