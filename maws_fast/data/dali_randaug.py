"""timm's RandAugment inside the DALI decode pipeline: the policy drawn on the host, the ops run by DALI.

The fine-tune's ``rand-m9-mstd0.5-inc1`` is drawn per sample exactly as the PIL path draws it
(:meth:`~maws_fast.data.randaug.RandAugment.plan`, from the sample's own seed), turned into one
``(code, 6 parameters)`` row per op slot, fed to the decode pipeline next to the crop boxes, and
applied there by DALI operators, on the GPU after nvJPEG or on CPU operators without one:

==================================  =========================================================
timm op                             DALI
==================================  =========================================================
Rotate, ShearX/Y, TranslateX/YRel   ``warp_affine`` with the PIL matrix computed on the host
AutoContrast                        per-channel ``reductions.min`` / ``max`` and arithmetic
Equalize                            ``equalize`` of the inverted image, rescaled to PIL's rule
Invert, Posterize, Solarize(Add)    integer arithmetic (``&`` for Posterize)
Brightness, Contrast, Color         PIL's blend with its degenerate image (black, mean grey,
                                    luma), truncated as PIL truncates
Sharpness                           ``filter`` with PIL's SMOOTH kernel, border kept as PIL
==================================  =========================================================

Why not DALI's ``auto_aug.rand_augment``: its draws come from the pipeline's own RNG, so a
batch would not be a function of (seed, epoch, batch, rank) -- a resumed run and the PIL
reference loader would augment differently -- and its magnitude scheme (bins, no ``mstd``, no
``inc1`` op set) is not timm's policy. The ops here are DALI's; only the choices come from the host.

Known differences from the PIL path (measured in tests/data/test_dali_randaug.py): geometric ops
sample bilinearly where the recipe's PIL ops sample bicubically (DALI's warp_affine has nearest
and linear filters only; against PIL's own bilinear the warp agrees to one grey level, bar the
odd pixel on the edge of the uncovered area, where float32 and float64 decide inside/outside
differently); Equalize rebuilds PIL's lookup table from DALI's (OpenCV's) through its rounded
output, so it can be one grey level off (exact on small images). Every other op is PIL's to the
grey level.

This module imports DALI only inside :func:`apply_rand_augment` (called while a pipeline is defined).
"""

from __future__ import annotations

import random

import numpy as np

from maws_fast.data.randaug import OpDraw, RandAugment, affine_coeffs
from maws_fast.seeds import Stream, mix_seed

# Op codes fed to the pipeline (0: the slot's op was skipped).
SKIP, AFFINE, AUTOCONTRAST, EQUALIZE, INVERT, POSTERIZE, SOLARIZE, SOLARIZE_ADD, COLOR, CONTRAST, BRIGHTNESS, \
    SHARPNESS = range(12)
_CODES = {
    "Rotate": AFFINE, "ShearX": AFFINE, "ShearY": AFFINE, "TranslateX": AFFINE, "TranslateY": AFFINE,
    "TranslateXRel": AFFINE, "TranslateYRel": AFFINE, "AutoContrast": AUTOCONTRAST, "Equalize": EQUALIZE,
    "Invert": INVERT, "Posterize": POSTERIZE, "PosterizeIncreasing": POSTERIZE, "Solarize": SOLARIZE,
    "SolarizeIncreasing": SOLARIZE, "SolarizeAdd": SOLARIZE_ADD, "Color": COLOR, "ColorIncreasing": COLOR,
    "Contrast": CONTRAST, "ContrastIncreasing": CONTRAST, "Brightness": BRIGHTNESS,
    "BrightnessIncreasing": BRIGHTNESS, "Sharpness": SHARPNESS, "SharpnessIncreasing": SHARPNESS,
}
# PIL's ImageFilter.SMOOTH (Sharpness's degenerate image): this 3x3 kernel over 13.
_SMOOTH = np.array([[1, 1, 1], [1, 5, 1], [1, 1, 1]], dtype=np.float32) / 13


def _posterize_mask(bits: int) -> int:
    """The AND mask of keeping ``bits`` high bits (PIL's posterize; 0 bits: black, as our PIL op)."""
    if bits >= 8:
        return 0xFF
    if bits <= 0:
        return 0
    return ~(2 ** (8 - bits) - 1) & 0xFF


def encode_draw(d: OpDraw, size: int) -> tuple[int, np.ndarray]:
    """One drawn op as the pipeline takes it: its code and a float32 ``(6,)`` row, an affine op's
    PIL matrix, the others' argument first (Posterize: the AND mask; Solarize: the threshold;
    SolarizeAdd: the addend; the enhance ops: the factor)."""
    code, row = _CODES[d.name], np.zeros(6, dtype=np.float32)
    if code == AFFINE:
        row[:] = affine_coeffs(d, size, size)
    elif code == POSTERIZE:
        row[0] = _posterize_mask(int(d.arg))
    elif d.arg is not None:
        row[0] = d.arg
    return code, row


def plan_batch(randaug: RandAugment, n: int, size: int, seed: int, epoch: int, batch: int,
               rank: int) -> tuple[list[np.ndarray], list[np.ndarray]]:
    """The op codes and parameters of one batch, from the seeds the PIL path uses.

    Sample i draws from ``mix_seed(Stream.RANDAUG, seed, epoch, batch, rank, i)`` exactly as
    :meth:`~maws_fast.data.batching.FinetuneAugment.images` does.

    Returns:
        ``(codes, params)``: per sample an int32 ``(num_ops,)`` and a float32 ``(num_ops, 6)``, one
        :func:`encode_draw` per op applied; the slots after them are skipped (code 0).
    """
    k = randaug.num_ops
    codes, params = [], []
    for i in range(n):
        s = mix_seed(Stream.RANDAUG, seed, epoch, batch, rank, i)
        c, p = np.zeros(k, dtype=np.int32), np.zeros((k, 6), dtype=np.float32)
        for j, d in enumerate(randaug.plan(random.Random(s), np.random.RandomState(s % 2**32))):
            c[j], p[j] = encode_draw(d, size)
        codes.append(c)
        params.append(p)
    return codes, params


def apply_rand_augment(x, codes, params, num_ops: int, fill: tuple[int, ...], size: int, channels: int,
                       gpu: bool = False):
    """The RandAugment ops on a batch of uint8 ``(size, size, channels)`` HWC images, inside a
    pipeline definition with ``enable_conditionals=True``.

    Args:
        x: the DataNode of the (cropped, resized, flipped) images.
        codes, params: DataNodes fed from :func:`plan_batch`.
        num_ops: op slots per image.
        fill: the uncovered area's colour per channel (0-255).
        size: the image side.
        channels: 3 or 1.
        gpu: the images are on the GPU (after mixed decode): the constants and each op's scalar
            parameter go there too; the op codes (the conditions) and warp matrices stay on the host.
    """
    from nvidia.dali import fn, types
    import nvidia.dali.math as dmath

    def dev(node):
        return node.gpu() if gpu else node

    fill_u8 = dev(types.Constant(np.asarray(fill, dtype=np.uint8)))
    one_u8, u255 = types.Constant(1, dtype=types.UINT8), types.Constant(255, dtype=types.UINT8)
    interior = np.zeros((size, size, 1), dtype=np.float32)  # PIL's 3x3 filters copy the border pixels
    interior[1:-1, 1:-1] = 1
    interior_c = dev(types.Constant(interior))
    ones = dev(types.Constant(np.ones((size, size, 1), dtype=np.uint8), layout="HWC"))

    def u8(v):
        """Float to uint8 as PIL's blend stores it: clipped to [0, 255], then truncated."""
        return fn.cast(dmath.floor(dmath.clamp(v, 0.0, 255.0)), dtype=types.UINT8)

    def luma(v):
        """PIL's RGB -> L: (19595 R + 38470 G + 7471 B + 2**15) >> 16, int32 (H, W, 1)."""
        if channels == 1:
            return v
        return (v[:, :, 0:1] * 19595 + v[:, :, 1:2] * 38470 + v[:, :, 2:3] * 7471 + 32768) // 65536

    def blend(degenerate, v, factor):
        return u8(degenerate + factor * (v - degenerate))  # float degenerate: the uint8 image promotes

    for k in range(num_ops):
        code, p = codes[k], params[k]
        arg = dev(p[0])  # the op's scalar argument, next to the pixels
        if code == AFFINE:
            # PIL fills an output pixel whose source point lies outside the image and samples
            # the others with edge-clamped neighbours. The same here: a clamped warp of the image,
            # and a nearest-neighbour warp of ones (fill 0) that is 1 exactly where the point is inside.
            m = fn.reshape(p, shape=[2, 3])
            inside = fn.warp_affine(ones, matrix=m, fill_value=0.0, interp_type=types.INTERP_NN)
            warped = fn.warp_affine(x, matrix=m, interp_type=types.INTERP_LINEAR)  # uint8, rounded
            x = warped * inside + fill_u8 * (one_u8 - inside)  # one uint8 expression: no term exceeds 255
        elif code == AUTOCONTRAST:
            # PIL's lookup table, int(i * scale + offset), evaluated in float64 as PIL does.
            xd = fn.cast(x, dtype=types.FLOAT64)
            lo = fn.cast(fn.reductions.min(x, axes=[0, 1]), dtype=types.FLOAT64)
            hi = fn.cast(fn.reductions.max(x, axes=[0, 1]), dtype=types.FLOAT64)
            spread = fn.cast(hi > lo, dtype=types.FLOAT64)  # a flat channel is left as it is
            scale = spread * (255.0 / dmath.max(hi - lo, 1.0)) + (1.0 - spread)
            x = u8(xd * scale + -lo * scale * spread)
        elif code == EQUALIZE:
            # PIL's rule from DALI's (OpenCV's). OpenCV maps level v to round((cdf(v) - cdf_min) *
            # 255 / (N - cdf_min)); on the inverted image that is round(below(v) * 255 / rest), with
            # below(v) the pixels darker than v and rest = N - (pixels at the top level), i.e. PIL's
            # exclusive CDF over rest / 255. PIL divides by the truncated step floor(rest / 255)
            # instead, and leaves a channel alone when that step is 0: rescaled and masked here.
            below = 255.0 - fn.equalize(u255 - x)  # uint8 - uint8 stays uint8; the float constant promotes
            top = fn.reductions.sum(fn.cast(x == fn.reductions.max(x, axes=[0, 1]), dtype=types.INT32), axes=[0, 1])
            rest = float(size * size) - top
            step = dmath.floor(rest / 255.0)
            on = step > 0.0
            lut = dmath.floor(below * rest / (255.0 * dmath.max(step, 1.0)) + 0.5)
            x = fn.cast(dmath.clamp(x + on * (lut - x), 0.0, 255.0), dtype=types.UINT8)
        elif code == INVERT:
            x = u255 - x
        elif code == POSTERIZE:
            x = x & fn.cast(arg, dtype=types.UINT8)
        elif code == SOLARIZE:
            i = fn.cast(x, dtype=types.INT32)
            above = fn.cast(fn.cast(i, dtype=types.FLOAT) >= arg, dtype=types.INT32)
            x = fn.cast(i + above * (255 - 2 * i), dtype=types.UINT8)
        elif code == SOLARIZE_ADD:
            i = fn.cast(x, dtype=types.INT32)
            below = fn.cast(i < 128, dtype=types.INT32)
            added = dmath.min(i + fn.cast(arg, dtype=types.INT32), 255)
            x = fn.cast(i + below * (added - i), dtype=types.UINT8)
        elif code == COLOR:
            x = blend(luma(x), x, arg) if channels == 3 else x  # a grey image has no colour to change
        elif code == CONTRAST:
            mean = dmath.floor(fn.reductions.mean(luma(x), dtype=types.FLOAT) + 0.5)
            x = blend(mean, x, arg)
        elif code == BRIGHTNESS:
            x = u8(arg * x)
        elif code == SHARPNESS:
            xf = fn.cast(x, dtype=types.FLOAT)
            smooth = fn.filter(xf, _SMOOTH, border="clamp")
            smooth = dmath.floor(smooth + 0.5)  # PIL's filter rounds to uint8
            degenerate = xf + interior_c * (smooth - xf)
            x = blend(degenerate, x, arg)
    return x
