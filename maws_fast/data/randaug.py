"""RandAugment (PIL) with the semantics of timm's, on injected RNGs (RandomErasing: :mod:`maws_fast.data.erasing`).

The official MAE fine-tune builds its training transform with timm's
``create_transform(is_training=True, auto_augment='rand-m9-mstd0.5-inc1', interpolation='bicubic',
re_prob=0.25, re_mode='pixel', re_count=1)``. This module reproduces the two random parts of that
pipeline -- ``rand_augment_transform`` and ``RandomErasing`` -- value for value, but every random
draw comes from a generator the caller owns instead of the process-global ``random``, ``np.random``
and torch RNGs. A loader worker can then make each sample's augmentation a pure function of its
seed. The draws are made in timm's order, so with the globals seeded ``s`` for timm and
``random.Random(s)`` / ``np.random.RandomState(s)`` / ``torch.Generator().manual_seed(s)`` passed
here, the outputs are pixel-identical (tests/data/test_randaug.py checks this against timm).

RNG order per RandAugment call (timm 1.0):
  1. ``np_rng.choice(n_ops, num_ops, replace=True)`` picks the ops (repeats allowed).
  2. For each picked op, from ``rng``: ``random()`` for the skip test (only when prob < 1), then
     ``gauss(m, mstd)`` (or ``uniform(0, m)`` when mstd is infinite; nothing when mstd is 0), then
     ``random()`` for the sign of signed ops, then ``choice((BILINEAR, BICUBIC))`` for geometric ops
     only when the interpolation is 'random'.

Two deliberate differences from timm 1.0 on the installed Pillow:
  * Posterize keeping 0 bits (PosterizeIncreasing at magnitude 10, which mstd0.5 reaches in about
    2% of its calls, or Posterize at 0) gives a black image, as older Pillow did (it masked every
    pixel with ~255); Pillow 13 raises "bits must be between or equal to 1 and 8" there, so timm
    crashes.
  * timm passes the RGB fill colour to greyscale ('L') images, which PIL rejects for the geometric
    ops ("color must be int or single-element tuple"). Here a 3-colour fill on an 'L' image is
    converted to grey the way PIL converts RGB to L.
"""

from __future__ import annotations

import math
import random
import re
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
from PIL import Image, ImageEnhance, ImageOps

from maws_fast.errors import ConfigError

IMAGENET_MEAN = (0.485, 0.456, 0.406)

_LEVEL_DENOM = 10.0  # magnitude M maps to the fractional level M / 10 of each op's full range
_BILINEAR = Image.Resampling.BILINEAR
_BICUBIC = Image.Resampling.BICUBIC
_RANDOM_INTERPOLATION = (_BILINEAR, _BICUBIC)  # what timm draws from when not told one
_INTERPOLATIONS = {
    "nearest": Image.Resampling.NEAREST,
    "bilinear": _BILINEAR,
    "bicubic": _BICUBIC,
    "box": Image.Resampling.BOX,
    "hamming": Image.Resampling.HAMMING,
    "lanczos": Image.Resampling.LANCZOS,
}

# The op sets of timm's RandAugment: 'inc1' picks the one whose ops grow stronger with M.
RAND_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "Posterize", "Solarize", "SolarizeAdd",
    "Color", "Contrast", "Brightness", "Sharpness", "ShearX", "ShearY",
    "TranslateXRel", "TranslateYRel",
)
RAND_INCREASING_OPS = (
    "AutoContrast", "Equalize", "Invert", "Rotate", "PosterizeIncreasing", "SolarizeIncreasing",
    "SolarizeAdd", "ColorIncreasing", "ContrastIncreasing", "BrightnessIncreasing",
    "SharpnessIncreasing", "ShearX", "ShearY", "TranslateXRel", "TranslateYRel",
)


# ------------------------------------------------------------------------------------------------
# Level -> op argument. Each takes the clipped magnitude level, the python RNG (for the random
# sign) and the RandAugment (for translate_const / translate_pct). The float expressions keep
# timm's evaluation order so that the arguments are bit-identical.


def _signed(value: float, rng: random.Random) -> float:
    """Negates with probability 1/2 (timm negates when ``random() > 0.5``)."""
    return -value if rng.random() > 0.5 else value


def _arg_rotate(level, rng, aug):  # degrees in [-30, 30]
    return _signed(level / _LEVEL_DENOM * 30.0, rng)


def _arg_shear(level, rng, aug):  # shear factor in [-0.3, 0.3]
    return _signed(level / _LEVEL_DENOM * 0.3, rng)


def _arg_translate_abs(level, rng, aug):  # pixels in [-translate_const, translate_const]
    return _signed(level / _LEVEL_DENOM * float(aug.translate_const), rng)


def _arg_translate_rel(level, rng, aug):  # fraction of the side in [-0.45, 0.45]
    return _signed(level / _LEVEL_DENOM * aug.translate_pct, rng)


def _arg_enhance(level, rng, aug):  # factor in [0.1, 1.9], 1 = unchanged
    return level / _LEVEL_DENOM * 1.8 + 0.1


def _arg_enhance_increasing(level, rng, aug):  # factor 1 +/- 0.9 * level, kept >= 0.1
    return max(0.1, 1.0 + _signed(level / _LEVEL_DENOM * 0.9, rng))


def _arg_posterize(level, rng, aug):  # bits kept in [0, 4]: fewer bits at LOWER magnitude
    return int(level / _LEVEL_DENOM * 4)


def _arg_posterize_increasing(level, rng, aug):  # bits kept in [4, 0]
    return 4 - _arg_posterize(level, rng, aug)


def _arg_solarize(level, rng, aug):  # threshold in [0, 256]: more inverted at LOWER magnitude
    return min(256, int(level / _LEVEL_DENOM * 256))


def _arg_solarize_increasing(level, rng, aug):  # threshold in [256, 0]
    return 256 - _arg_solarize(level, rng, aug)


def _arg_solarize_add(level, rng, aug):  # added to pixels below 128, in [0, 110]
    return min(128, int(level / _LEVEL_DENOM * 110))


# ------------------------------------------------------------------------------------------------
# The image ops. Geometric ones take (img, arg, resample, fill); the others (img, arg).


def _affine(img: Image.Image, coeffs, resample, fill) -> Image.Image:
    # PIL's AFFINE maps each OUTPUT pixel (x, y) to the input (a x + b y + c, d x + e y + f).
    return img.transform(img.size, Image.AFFINE, coeffs, resample=resample, fillcolor=fill)


def _shear_x(img, factor, resample, fill):
    return _affine(img, (1, factor, 0, 0, 1, 0), resample, fill)


def _shear_y(img, factor, resample, fill):
    return _affine(img, (1, 0, 0, factor, 1, 0), resample, fill)


def _translate_x_abs(img, pixels, resample, fill):
    return _affine(img, (1, 0, pixels, 0, 1, 0), resample, fill)


def _translate_y_abs(img, pixels, resample, fill):
    return _affine(img, (1, 0, 0, 0, 1, pixels), resample, fill)


def _translate_x_rel(img, pct, resample, fill):
    return _affine(img, (1, 0, pct * img.size[0], 0, 1, 0), resample, fill)


def _translate_y_rel(img, pct, resample, fill):
    return _affine(img, (1, 0, 0, 0, 1, pct * img.size[1]), resample, fill)


def _rotate(img, degrees, resample, fill):
    return img.rotate(degrees, resample=resample, fillcolor=fill)


def _posterize(img, bits):
    if bits >= 8:
        return img
    if bits <= 0:
        # Keeping 0 bits: the Pillow of the official recipes masked every pixel to 0 (black);
        # Pillow 13 raises "bits must be between or equal to 1 and 8" (so timm 1.0 does too).
        return img.point([0] * 256 * len(img.getbands()))
    return ImageOps.posterize(img, bits)


def _solarize_add(img, add, thresh=128):
    if img.mode not in ("L", "RGB"):
        return img  # as timm: other modes pass through unchanged
    lut = [min(255, i + add) if i < thresh else i for i in range(256)]
    return img.point(lut * len(img.getbands()))


def _enhancer(cls) -> Callable[[Image.Image, float], Image.Image]:
    return lambda img, factor: cls(img).enhance(factor)


@dataclass(frozen=True)
class _OpSpec:
    apply: Callable
    level_to_arg: Callable | None = None  # None: the op takes no argument
    geometric: bool = False  # takes resample + fill


@dataclass(frozen=True)
class OpDraw:
    """One op of a RandAugment call as drawn: its name, argument (None: takes none) and, for
    geometric ops, the resampling filter."""

    name: str
    arg: float | int | None = None
    resample: Image.Resampling | None = None


OPS: dict[str, _OpSpec] = {
    "AutoContrast": _OpSpec(lambda img: ImageOps.autocontrast(img)),
    "Equalize": _OpSpec(lambda img: ImageOps.equalize(img)),
    "Invert": _OpSpec(lambda img: ImageOps.invert(img)),
    "Rotate": _OpSpec(_rotate, _arg_rotate, geometric=True),
    "Posterize": _OpSpec(_posterize, _arg_posterize),
    "PosterizeIncreasing": _OpSpec(_posterize, _arg_posterize_increasing),
    "Solarize": _OpSpec(ImageOps.solarize, _arg_solarize),
    "SolarizeIncreasing": _OpSpec(ImageOps.solarize, _arg_solarize_increasing),
    "SolarizeAdd": _OpSpec(_solarize_add, _arg_solarize_add),
    "Color": _OpSpec(_enhancer(ImageEnhance.Color), _arg_enhance),
    "ColorIncreasing": _OpSpec(_enhancer(ImageEnhance.Color), _arg_enhance_increasing),
    "Contrast": _OpSpec(_enhancer(ImageEnhance.Contrast), _arg_enhance),
    "ContrastIncreasing": _OpSpec(_enhancer(ImageEnhance.Contrast), _arg_enhance_increasing),
    "Brightness": _OpSpec(_enhancer(ImageEnhance.Brightness), _arg_enhance),
    "BrightnessIncreasing": _OpSpec(_enhancer(ImageEnhance.Brightness), _arg_enhance_increasing),
    "Sharpness": _OpSpec(_enhancer(ImageEnhance.Sharpness), _arg_enhance),
    "SharpnessIncreasing": _OpSpec(_enhancer(ImageEnhance.Sharpness), _arg_enhance_increasing),
    "ShearX": _OpSpec(_shear_x, _arg_shear, geometric=True),
    "ShearY": _OpSpec(_shear_y, _arg_shear, geometric=True),
    "TranslateX": _OpSpec(_translate_x_abs, _arg_translate_abs, geometric=True),
    "TranslateY": _OpSpec(_translate_y_abs, _arg_translate_abs, geometric=True),
    "TranslateXRel": _OpSpec(_translate_x_rel, _arg_translate_rel, geometric=True),
    "TranslateYRel": _OpSpec(_translate_y_rel, _arg_translate_rel, geometric=True),
}


def affine_coeffs(d: OpDraw, width: int, height: int) -> tuple[float, ...]:
    """The PIL ``AFFINE`` coefficients ``(a, b, c, d, e, f)`` of a geometric op on a ``width`` x
    ``height`` image: output pixel (x, y) samples the input at (a x + b y + c, d x + e y + f), in
    pixel-corner coordinates (the centre of pixel i at i + 0.5), as PIL and DALI's warp_affine both
    read them. Rotate is PIL's ``Image.rotate`` matrix (about the centre, counter-clockwise)."""
    n, v = d.name, float(d.arg)
    if n == "Rotate":
        a = -math.radians(v % 360.0)
        m = [round(math.cos(a), 15), round(math.sin(a), 15), 0.0, round(-math.sin(a), 15), round(math.cos(a), 15), 0.0]
        cx, cy = width / 2, height / 2
        m[2] = m[0] * -cx + m[1] * -cy + cx
        m[5] = m[3] * -cx + m[4] * -cy + cy
        return tuple(m)
    table = {
        "ShearX": (1, v, 0, 0, 1, 0), "ShearY": (1, 0, 0, v, 1, 0),
        "TranslateX": (1, 0, v, 0, 1, 0), "TranslateY": (1, 0, 0, 0, 1, v),
        "TranslateXRel": (1, 0, v * width, 0, 1, 0), "TranslateYRel": (1, 0, 0, 0, 1, v * height),
    }
    if n not in table:
        raise ValueError(f"{n} is not a geometric op")
    return tuple(float(c) for c in table[n])

_POLICY_FORM = "rand-m<int>[-n<int>][-p<float>][-mstd<float>][-mmax<int>][-inc<0|1>]"


def parse_rand_policy(policy: str) -> dict:
    """Parses a timm RandAugment policy string such as ``"rand-m9-mstd0.5-inc1"``.

    Sections after ``rand`` are a key followed by a number, in any order: ``m`` magnitude (int),
    ``n`` ops per image (int), ``p`` probability of each op (float), ``mstd`` std of the magnitude
    noise (float; above 100 means uniform in [0, m], as timm), ``mmax`` magnitude clip (int),
    ``inc`` 1 for the increasing op set. Left-out sections take timm's defaults: m10, n2, p0.5,
    mstd0, mmax10, inc0.

    Returns:
        keyword arguments for :class:`RandAugment`.

    Raises:
        ConfigError: the string does not start with ``rand``, or has an unknown, repeated or
            malformed section.
    """
    sections = policy.split("-")
    if sections[0] != "rand":
        raise ConfigError(
            f"RandAugment policy {policy!r} must start with 'rand' (form {_POLICY_FORM}); "
            "to disable RandAugment, leave the transform out instead"
        )
    # timm's defaults for the sections left out (not this class's constructor defaults).
    kwargs: dict = dict(magnitude=10, num_ops=2, prob=0.5, magnitude_std=0.0, magnitude_max=10)
    increasing = False
    seen: set[str] = set()
    for section in sections[1:]:
        m = re.fullmatch(r"([a-z]+)(\d.*)", section)
        if m is None:
            hint = " (timm's 't<name>' op sets are not supported)" if section[:1] == "t" else ""
            raise ConfigError(
                f"RandAugment policy {policy!r}: bad section {section!r}{hint}; "
                f"expected the form {_POLICY_FORM}"
            )
        key, val = m.groups()
        if key not in ("m", "n", "p", "mstd", "mmax", "inc"):
            raise ConfigError(
                f"RandAugment policy {policy!r}: unknown section key {key!r}; "
                f"expected the form {_POLICY_FORM}"
            )
        if key in seen:
            raise ConfigError(f"RandAugment policy {policy!r}: section {key!r} given twice")
        seen.add(key)
        try:
            if key == "m":
                kwargs["magnitude"] = int(val)
            elif key == "n":
                kwargs["num_ops"] = int(val)
            elif key == "p":
                kwargs["prob"] = float(val)
            elif key == "mstd":
                std = float(val)
                kwargs["magnitude_std"] = math.inf if std > 100 else std
            elif key == "mmax":
                kwargs["magnitude_max"] = int(val)
            else:  # "inc"
                increasing = bool(int(val))
        except ValueError:
            raise ConfigError(
                f"RandAugment policy {policy!r}: section {section!r} has a malformed number "
                f"{val!r}; expected the form {_POLICY_FORM}"
            ) from None
    kwargs["ops"] = RAND_INCREASING_OPS if increasing else RAND_OPS
    return kwargs


class RandAugment:
    """timm's RandAugment on PIL images (RGB or L), drawing from caller-owned RNGs.

    Per call: ``num_ops`` ops are picked uniformly with replacement; each is skipped with
    probability ``1 - prob``, otherwise applied at magnitude ``gauss(magnitude, magnitude_std)``
    clipped to [0, magnitude_max] (out of a full range at 10).

    Args:
        ops: names of the ops to pick from (keys of :data:`OPS`).
        num_ops: ops per image.
        magnitude: magnitude M, the full range of each op at 10.
        magnitude_std: std of the per-op magnitude noise; ``math.inf`` for uniform in [0, M].
        magnitude_max: upper clip of the noisy magnitude (timm's ``mmax``; 0 means 10 as in timm).
        prob: probability that each picked op is applied.
        translate_const: full range in pixels of TranslateX / TranslateY (absolute).
        translate_pct: full range of TranslateXRel / TranslateYRel as a fraction of the side.
        fill: colour of the area that geometric ops uncover, 0-255 per channel.
        interpolation: resampling of geometric ops: a name ('bicubic', 'bilinear', ...) or
            'random' to draw bilinear or bicubic per op call as timm does without a fixed one.
        seed: seeds the default RNGs used when a call passes none (None: from OS entropy;
            numpy's RandomState needs ``0 <= seed < 2**32``).
    """

    def __init__(
        self,
        ops: Sequence[str] = RAND_INCREASING_OPS,
        num_ops: int = 2,
        magnitude: int | float = 9,
        magnitude_std: float = 0.5,
        magnitude_max: int | float = 10,
        prob: float = 0.5,
        translate_const: int = 100,
        translate_pct: float = 0.45,
        fill: int | Sequence[int] = (128, 128, 128),
        interpolation: str = "bicubic",
        seed: int | None = None,
    ):
        unknown = [name for name in ops if name not in OPS]
        if unknown or not ops:
            raise ConfigError(
                f"RandAugment: unknown op(s) {unknown} (or no ops); choose from {sorted(OPS)}"
            )
        if num_ops < 0 or magnitude < 0 or magnitude_std < 0 or not 0.0 <= prob <= 1.0:
            raise ConfigError(
                f"RandAugment: need num_ops >= 0, magnitude >= 0, magnitude_std >= 0 and "
                f"0 <= prob <= 1; got {num_ops}, {magnitude}, {magnitude_std}, {prob}"
            )
        if interpolation != "random" and interpolation not in _INTERPOLATIONS:
            raise ConfigError(
                f"RandAugment: unknown interpolation {interpolation!r}; "
                f"choose from {sorted(_INTERPOLATIONS)} or 'random'"
            )
        self.ops = tuple(ops)
        self.num_ops = num_ops
        self.magnitude = magnitude
        self.magnitude_std = magnitude_std
        self.magnitude_max = magnitude_max
        self.prob = prob
        self.translate_const = translate_const
        self.translate_pct = translate_pct
        self.fill = fill if isinstance(fill, int) else tuple(int(c) for c in fill)
        self.interpolation = interpolation
        self.rng = random.Random(seed)
        self.np_rng = np.random.RandomState(seed)

    @classmethod
    def from_policy(
        cls,
        policy: str,
        img_size: int | Sequence[int],
        mean: Sequence[float] = IMAGENET_MEAN,
        interpolation: str = "bicubic",
        seed: int | None = None,
    ) -> RandAugment:
        """Builds the RandAugment that timm's ``create_transform`` builds for ``policy``.

        Args:
            policy: e.g. ``"rand-m9-mstd0.5-inc1"`` (see :func:`parse_rand_policy`).
            img_size: the crop size, int or (h, w); translate_const = int(0.45 * min side).
            mean: normalisation mean in [0, 1]; the fill colour is it in 0-255.
            interpolation: as :class:`RandAugment`.
            seed: as :class:`RandAugment`.
        """
        size_min = min(img_size) if isinstance(img_size, (tuple, list)) else img_size
        return cls(
            **parse_rand_policy(policy),
            translate_const=int(size_min * 0.45),
            fill=tuple(min(255, round(255 * c)) for c in mean),
            interpolation=interpolation,
            seed=seed,
        )

    def _fill_for(self, img: Image.Image) -> int | tuple[int, ...]:
        if isinstance(self.fill, int) or img.mode != "L":
            return self.fill
        if len(self.fill) == 1:
            return self.fill
        # PIL refuses a 3-colour fill on a 1-band image; use the colour's grey value.
        return Image.new("RGB", (1, 1), self.fill[:3]).convert("L").getpixel((0, 0))

    def draw_op(self, name: str, rng: random.Random | None = None) -> OpDraw | None:
        """Draws one op's random parameters as timm's ``AugmentOp(name, prob, magnitude, hparams)`` does,
        touching no pixels; None when the op is skipped.

        Draws from ``rng`` (default: this object's) in timm's order: the skip test (prob < 1),
        the magnitude noise (magnitude_std > 0), the sign, the interpolation ('random' only).
        """
        rng = self.rng if rng is None else rng
        if self.prob < 1.0 and rng.random() > self.prob:
            return None
        level = self.magnitude
        if self.magnitude_std == math.inf:
            level = rng.uniform(0, level)
        elif self.magnitude_std > 0:
            level = rng.gauss(level, self.magnitude_std)
        level = max(0.0, min(level, self.magnitude_max or _LEVEL_DENOM))
        spec = OPS[name]
        arg = None if spec.level_to_arg is None else spec.level_to_arg(level, rng, self)
        if not spec.geometric:
            return OpDraw(name, arg)
        if self.interpolation == "random":
            resample = rng.choice(_RANDOM_INTERPOLATION)  # drawn after the sign, as timm
        else:
            resample = _INTERPOLATIONS[self.interpolation]
        return OpDraw(name, arg, resample)

    def plan(self, rng: random.Random | None = None, np_rng: np.random.RandomState | None = None) -> list[OpDraw]:
        """Every random draw of one call (the ops applied, in order, with their arguments), no pixels.

        ``__call__`` is ``plan`` followed by :meth:`apply_draw` of each, so the DALI pipeline,
        which runs the ops on its own operators, makes exactly the PIL path's choices.
        """
        rng = self.rng if rng is None else rng
        np_rng = self.np_rng if np_rng is None else np_rng
        # Same draw as timm's np.random.choice(ops, n, replace=True): randint(0, len, n).
        picks = np_rng.choice(len(self.ops), self.num_ops, replace=True)
        return [d for d in (self.draw_op(self.ops[i], rng) for i in picks) if d is not None]

    def apply_draw(self, img: Image.Image, d: OpDraw) -> Image.Image:
        """Applies one drawn op to a PIL image."""
        spec = OPS[d.name]
        args = () if d.arg is None else (d.arg,)
        if not spec.geometric:
            return spec.apply(img, *args)
        return spec.apply(img, *args, d.resample, self._fill_for(img))

    def apply_op(self, img: Image.Image, name: str, rng: random.Random | None = None):
        """Applies one op as timm's ``AugmentOp(name, prob, magnitude, hparams)`` does (draws as
        :meth:`draw_op`)."""
        d = self.draw_op(name, rng)
        return img if d is None else self.apply_draw(img, d)

    def __call__(
        self,
        img: Image.Image,
        rng: random.Random | None = None,
        np_rng: np.random.RandomState | None = None,
    ) -> Image.Image:
        """Augments one image.

        Args:
            img: an RGB or L PIL image.
            rng: python RNG for the per-op draws (default: this object's).
            np_rng: numpy RNG for picking the ops (default: this object's).

        Returns:
            a new PIL image (or ``img`` itself when every picked op was skipped).
        """
        if img.mode not in ("RGB", "L"):
            raise ValueError(
                f"RandAugment takes RGB or L images, got mode {img.mode!r}; "
                "convert it first with img.convert('RGB')"
            )
        for d in self.plan(rng, np_rng):
            img = self.apply_draw(img, d)
        return img

    def fill_for(self, channels: int) -> tuple[int, ...]:
        """The colour geometric ops uncover, one value per channel (grey images: as PIL converts it)."""
        if isinstance(self.fill, int):
            return (self.fill,) * channels
        if channels == 1:
            grey = self._fill_for(Image.new("L", (1, 1)))
            return (grey,) if isinstance(grey, int) else tuple(grey[:1])
        return tuple(self.fill[:channels])

    def __repr__(self) -> str:
        return (
            f"{type(self).__name__}(n={self.num_ops}, m={self.magnitude}, "
            f"mstd={self.magnitude_std}, p={self.prob}, ops={list(self.ops)})"
        )
