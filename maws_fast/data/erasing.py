"""RandomErasing (tensor) with the semantics of timm's, on injected RNGs.

The official MAE fine-tune erases with timm's ``RandomErasing(re_prob=0.25, re_mode='pixel',
re_count=1)`` after normalisation. This is the same draw for draw, its geometry from a
``random.Random`` and its noise from a ``torch.Generator`` the caller owns (so a sample's erasing is
a pure function of its seed), in timm's order; tests/data/test_randaug.py checks it against timm.
"""

from __future__ import annotations

import math
import random

import torch

from maws_fast.errors import ConfigError


class RandomErasing:
    """timm's RandomErasing on normalised (C, H, W) or (B, C, H, W) tensors, on injected RNGs.

    With probability ``probability`` per image, erases ``count`` boxes (count in [min_count,
    max_count]). Each box: up to 10 attempts of area ~ U(min_area, max_area) * H * W / count and
    log aspect ~ U(log min_aspect, log max_aspect), ``h = round(sqrt(area * aspect))``,
    ``w = round(sqrt(area / aspect))``; the first with h < H and w < W gets a uniform top-left
    corner and is filled: 'pixel' with per-pixel N(0, 1), 'rand' with one N(0, 1) per channel,
    'const' with 0. The geometry comes from a ``random.Random`` and the noise from a
    ``torch.Generator``, in timm's order.

    The input is NOT modified unless ``inplace=True`` (timm always erases in place); the result
    is always a new tensor when ``inplace=False``.

    Args:
        probability: chance that an image is erased at all.
        mode: 'pixel', 'rand' or 'const'.
        min_area: smallest box area as a fraction of the image.
        max_area: largest box area as a fraction of the image.
        min_aspect: smallest aspect ratio h / w.
        max_aspect: largest aspect ratio (default 1 / min_aspect).
        min_count: fewest boxes per erased image.
        max_count: most boxes per erased image (default min_count).
        inplace: erase into the input tensor instead of a copy.
        seed: seeds the default RNGs used when a call passes none (None: from OS entropy).
    """

    def __init__(
        self,
        probability: float = 0.25,
        mode: str = "pixel",
        min_area: float = 0.02,
        max_area: float = 1 / 3,
        min_aspect: float = 0.3,
        max_aspect: float | None = None,
        min_count: int = 1,
        max_count: int | None = None,
        inplace: bool = False,
        seed: int | None = None,
    ):
        max_aspect = max_aspect or 1 / min_aspect
        max_count = max_count or min_count
        mode = mode.lower()
        if mode not in ("pixel", "rand", "const"):
            raise ConfigError(
                f"RandomErasing: unknown mode {mode!r}; use 'pixel', 'rand' or 'const'"
            )
        if not 0.0 <= probability <= 1.0:
            raise ConfigError(f"RandomErasing: probability must be in [0, 1], got {probability}")
        if not 0.0 < min_area <= max_area or not 0.0 < min_aspect <= max_aspect:
            raise ConfigError(
                f"RandomErasing: need 0 < min_area <= max_area and 0 < min_aspect <= max_aspect; "
                f"got areas ({min_area}, {max_area}), aspects ({min_aspect}, {max_aspect})"
            )
        if not 1 <= min_count <= max_count:
            raise ConfigError(
                f"RandomErasing: need 1 <= min_count <= max_count, got ({min_count}, {max_count})"
            )
        self.probability = probability
        self.mode = mode
        self.min_area = min_area
        self.max_area = max_area
        self.log_aspect = (math.log(min_aspect), math.log(max_aspect))
        self.min_count = min_count
        self.max_count = max_count
        self.inplace = inplace
        self.rng = random.Random(seed)
        self.generator = torch.Generator()
        if seed is None:
            self.generator.seed()  # a fresh Generator's default seed is a constant
        else:
            self.generator.manual_seed(seed)

    def sample_boxes(self, img_h: int, img_w: int, rng: random.Random | None = None):
        """Draws the boxes for one image from ``rng`` as timm does (no noise is drawn).

        Returns:
            a list of ``(top, left, h, w)``, empty when the image is not erased or no attempt fit.
        """
        rng = self.rng if rng is None else rng
        if rng.random() > self.probability:
            return []
        area = img_h * img_w
        count = self.min_count
        if self.min_count != self.max_count:
            count = rng.randint(self.min_count, self.max_count)
        boxes = []
        for _ in range(count):
            for _attempt in range(10):
                target_area = rng.uniform(self.min_area, self.max_area) * area / count
                aspect = math.exp(rng.uniform(*self.log_aspect))
                h = int(round(math.sqrt(target_area * aspect)))
                w = int(round(math.sqrt(target_area / aspect)))
                if w < img_w and h < img_h:
                    top = rng.randint(0, img_h - h)
                    left = rng.randint(0, img_w - w)
                    boxes.append((top, left, h, w))
                    break
        return boxes

    def _fill(self, chan: int, h: int, w: int, like: torch.Tensor, gen: torch.Generator):
        if self.mode == "const":
            return torch.zeros((chan, 1, 1), dtype=like.dtype, device=like.device)
        shape = (chan, h, w) if self.mode == "pixel" else (chan, 1, 1)
        # Drawn in the image's dtype on the generator's device, as timm draws on its own device;
        # a CPU generator with a CUDA image costs one small host-to-device copy per box.
        noise = torch.empty(shape, dtype=like.dtype, device=gen.device).normal_(generator=gen)
        return noise.to(like.device)

    def __call__(
        self,
        x: torch.Tensor,
        rng: random.Random | None = None,
        generator: torch.Generator | None = None,
    ) -> torch.Tensor:
        """Erases boxes in one normalised image (C, H, W) or in each image of a batch (B, C, H, W).

        Args:
            x: float tensor, already normalised by the dataset mean and std.
            rng: python RNG for the boxes (default: this object's).
            generator: torch generator for the noise (default: this object's).

        Returns:
            the erased tensor: ``x`` itself when ``inplace``, else a new tensor.
        """
        if x.dim() not in (3, 4):
            raise ValueError(f"RandomErasing takes (C, H, W) or (B, C, H, W), got {tuple(x.shape)}")
        rng = self.rng if rng is None else rng
        gen = self.generator if generator is None else generator
        out = x if self.inplace else x.clone()
        images = [out] if out.dim() == 3 else list(out.unbind(0))  # views into out
        for img in images:
            chan, img_h, img_w = img.shape
            # All boxes of an image are drawn before any noise; the two streams are
            # independent, so this is the same as timm's interleaved draws.
            for top, left, h, w in self.sample_boxes(img_h, img_w, rng):
                img[:, top : top + h, left : left + w] = self._fill(chan, h, w, img, gen)
        return out

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(p={self.probability}, mode={self.mode}, "
            f"count=({self.min_count}, {self.max_count}), inplace={self.inplace})"
        )
