"""RandAugment and RandomErasing match timm's pixel for pixel on injected RNGs.

timm draws from the process-global RNGs; ours from the RNGs passed in. Seeding the globals with
``s`` for timm and passing ``random.Random(s)`` / ``np.random.RandomState(s)`` /
``torch.Generator().manual_seed(s)`` to ours must give identical outputs.
"""

from __future__ import annotations

import math
import random

import numpy as np
import pytest
import torch
from PIL import Image

from maws_fast.data.erasing import RandomErasing
from maws_fast.data.randaug import (
    IMAGENET_MEAN,
    OPS,
    RAND_INCREASING_OPS,
    RandAugment,
    parse_rand_policy,
)
from maws_fast.errors import ConfigError

timm = pytest.importorskip("timm")
from timm.data.auto_augment import AugmentOp, rand_augment_transform  # noqa: E402
from timm.data.random_erasing import RandomErasing as TimmErasing  # noqa: E402

SEEDS = range(30)
POLICY = "rand-m9-mstd0.5-inc1"
FILL = tuple(min(255, round(255 * c)) for c in IMAGENET_MEAN)  # as timm's create_transform


def _images() -> dict[str, Image.Image]:
    """Noise (two sizes), a smooth gradient (geometric ops visible) and a greyscale image."""
    g = np.random.default_rng(1234)
    yy, xx = np.mgrid[0:48, 0:72]
    gradient = np.stack([xx * 255 // 71, yy * 255 // 47, (xx + yy) * 255 // 118], -1)
    return {
        "rgb40x56": Image.fromarray(g.integers(0, 256, (40, 56, 3), dtype=np.uint8), "RGB"),
        "rgb64x64": Image.fromarray(g.integers(0, 256, (64, 64, 3), dtype=np.uint8), "RGB"),
        "gradient48x72": Image.fromarray(gradient.astype(np.uint8), "RGB"),
        "grey40x56": Image.fromarray(g.integers(0, 256, (40, 56), dtype=np.uint8), "L"),
    }


IMAGES = _images()


def _grey(rgb) -> int:
    return Image.new("RGB", (1, 1), rgb).convert("L").getpixel((0, 0))


def _timm_hparams(img: Image.Image, interpolation=Image.Resampling.BICUBIC, **extra) -> dict:
    # timm's create_transform hparams; a greyscale image needs a 1-band fill in timm (PIL rejects
    # a 3-tuple), which is what ours converts the RGB fill to.
    w, h = img.size
    fill = FILL if img.mode == "RGB" else _grey(FILL)
    hp = dict(translate_const=int(min(h, w) * 0.45), img_mean=fill)
    if interpolation is not None:
        hp["interpolation"] = interpolation
    hp.update(extra)
    return hp


def _timm_apply(fn, img, seed):
    """timm's output on globals seeded with ``seed``; None where timm hits Posterize(0 bits).

    Pillow 13 raises for 0 bits (older Pillow returned black, which ours keeps), so timm 1.0
    crashes there and those draws cannot be compared.
    """
    random.seed(seed)
    np.random.seed(seed)
    try:
        return fn(img)
    except ValueError as e:
        if "bits must be between" not in str(e):
            raise
        return None


def _same(a: Image.Image, b: Image.Image) -> bool:
    return a.mode == b.mode and a.size == b.size and np.array_equal(np.asarray(a), np.asarray(b))


@pytest.mark.parametrize("name", list(IMAGES))
def test_randaugment_matches_timm(name):
    img = IMAGES[name]
    ref = rand_augment_transform(POLICY, _timm_hparams(img))
    ours = RandAugment.from_policy(POLICY, img_size=img.size[::-1], mean=IMAGENET_MEAN)
    changed = crashed = 0
    for s in SEEDS:
        want = _timm_apply(ref, img, s)
        got = ours(img, random.Random(s), np.random.RandomState(s))
        if want is None:
            crashed += 1
            continue
        assert _same(got, want), f"{name} seed {s}"
        changed += not _same(got, img)
    assert crashed <= 2
    assert changed > len(SEEDS) // 2  # the comparison is not between untouched images


@pytest.mark.parametrize(
    "policy", ["rand-m9-n3-p0.7-mstd0.5", "rand-m7-mstd101-inc1", "rand-m12-mmax15-mstd1"]
)
def test_other_policies_match_timm(policy):
    img = IMAGES["gradient48x72"]
    ref = rand_augment_transform(policy, _timm_hparams(img))
    ours = RandAugment.from_policy(policy, img_size=img.size[::-1])
    compared = 0
    for s in range(12):
        want = _timm_apply(ref, img, s)
        got = ours(img, random.Random(s), np.random.RandomState(s))
        if want is not None:
            assert _same(got, want), f"{policy} seed {s}"
            compared += 1
    assert compared >= 10


def test_random_interpolation_matches_timm():
    # Without a fixed interpolation timm draws bilinear/bicubic per geometric op from `random`.
    img = IMAGES["gradient48x72"]
    ref = rand_augment_transform(POLICY, _timm_hparams(img, interpolation=None))
    ours = RandAugment.from_policy(POLICY, img_size=img.size[::-1], interpolation="random")
    for s in range(20):
        want = _timm_apply(ref, img, s)
        got = ours(img, random.Random(s), np.random.RandomState(s))
        assert want is None or _same(got, want), f"seed {s}"


@pytest.mark.parametrize("op", sorted(OPS))
def test_each_op_matches_timm(op):
    for img in (IMAGES["rgb40x56"], IMAGES["gradient48x72"], IMAGES["grey40x56"]):
        w, h = img.size
        for m in (0, 3, 9, 10):
            ref = AugmentOp(op, prob=1.0, magnitude=m, hparams=_timm_hparams(img))
            ours = RandAugment(
                ops=[op], magnitude=m, magnitude_std=0.0, prob=1.0, fill=FILL,
                translate_const=int(min(h, w) * 0.45),
            )
            for s in range(3):
                want = _timm_apply(ref, img, s)
                got = ours.apply_op(img, op, random.Random(s))
                if want is None:  # Posterize keeping 0 bits: black, as older Pillow
                    assert op.startswith("Posterize") and not np.asarray(got).any()
                    want = Image.new(img.mode, img.size)
                assert _same(got, want), f"{op} m={m} {img.mode} seed {s}"


def test_each_op_with_noise_and_skips_matches_timm():
    img = IMAGES["rgb64x64"]
    hp = _timm_hparams(img, magnitude_std=0.5)
    for op in RAND_INCREASING_OPS:
        ref = AugmentOp(op, prob=0.5, magnitude=9, hparams=hp)
        ours = RandAugment(ops=[op], magnitude=9, magnitude_std=0.5, prob=0.5, fill=FILL)
        for s in range(6):
            want = _timm_apply(ref, img, s)
            got = ours.apply_op(img, op, random.Random(s))
            assert want is None or _same(got, want), f"{op} seed {s}"


def test_geometric_ops_fill_uncovered_area_with_the_mean():
    img = IMAGES["gradient48x72"]
    ours = RandAugment(ops=["TranslateXRel"], magnitude=10, magnitude_std=0, prob=1.0, fill=FILL)
    out = np.asarray(ours.apply_op(img, "TranslateXRel", random.Random(0)))
    shifted = int(0.45 * img.size[0])
    edge = out[:, -shifted + 1 :] if (out[:, -1] == FILL).all() else out[:, : shifted - 1]
    assert (edge == np.array(FILL, dtype=np.uint8)).all()


def test_own_rngs_are_used_and_globals_untouched():
    img = IMAGES["rgb40x56"]
    random.seed(7)
    np.random.seed(7)
    before = (random.getstate(), np.random.get_state()[1].copy())
    a = RandAugment.from_policy(POLICY, img_size=40, seed=3)
    b = RandAugment.from_policy(POLICY, img_size=40, seed=3)
    outs_a = [np.asarray(a(img)) for _ in range(5)]
    outs_b = [np.asarray(b(img)) for _ in range(5)]
    assert all(np.array_equal(x, y) for x, y in zip(outs_a, outs_b))
    assert random.getstate() == before[0]
    assert np.array_equal(np.random.get_state()[1], before[1])


def test_parse_policy():
    kw = parse_rand_policy(POLICY)
    assert kw["magnitude"] == 9 and kw["magnitude_std"] == 0.5 and kw["num_ops"] == 2
    assert kw["ops"] == RAND_INCREASING_OPS and kw["prob"] == 0.5
    assert parse_rand_policy("rand-mstd200")["magnitude_std"] == math.inf
    assert parse_rand_policy("rand")["magnitude"] == 10  # timm's default


@pytest.mark.parametrize(
    "policy, match",
    [
        ("none", "must start with 'rand'"),
        ("augmix-m9", "must start with 'rand'"),
        ("rand-m9-x3", "unknown section key 'x'"),
        ("rand-m9-tweights", "not supported"),
        ("rand-m9-foo", "bad section 'foo'"),
        ("rand-m9.5", "malformed number"),
        ("rand-m9-m8", "given twice"),
    ],
)
def test_bad_policy_is_a_clear_error(policy, match):
    with pytest.raises(ConfigError, match=match) as e:
        RandAugment.from_policy(policy, img_size=224)
    assert "rand-m<int>" in str(e.value) or "twice" in str(e.value)
    assert isinstance(e.value, ValueError)


def test_bad_arguments_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown op"):
        RandAugment(ops=["Cutout"])
    with pytest.raises(ConfigError, match="interpolation"):
        RandAugment(interpolation="cubic")
    with pytest.raises(ValueError, match="RGB or L"):
        RandAugment(seed=0)(Image.new("RGBA", (8, 8)))
    with pytest.raises(ConfigError, match="mode"):
        RandomErasing(mode="noise")
    with pytest.raises(ConfigError, match="probability"):
        RandomErasing(probability=1.5)


# ------------------------------------------------------------------------------------------------
# RandomErasing


def _normalised(shape, seed=99) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 1.3 - 0.2


def _timm_erase(ref, x, seed):
    random.seed(seed)
    torch.manual_seed(seed)
    return ref(x.clone())  # timm erases in place


@pytest.mark.parametrize(
    "kwargs",
    [
        dict(probability=0.25, mode="pixel", max_count=1),  # the official MAE fine-tune
        dict(probability=1.0, mode="pixel", max_count=1),
        dict(probability=1.0, mode="rand", max_count=3),
        dict(probability=0.8, mode="const", min_count=2, max_count=4),
    ],
)
@pytest.mark.parametrize("shape", [(3, 32, 48), (4, 3, 32, 48)])
def test_random_erasing_matches_timm(kwargs, shape):
    x = _normalised(shape)
    ref = TimmErasing(device="cpu", **kwargs)
    ours = RandomErasing(**kwargs)
    erased = 0
    for s in SEEDS:
        want = _timm_erase(ref, x, s)
        got = ours(x, random.Random(s), torch.Generator().manual_seed(s))
        assert torch.equal(got, want), f"{kwargs} seed {s}"
        erased += not torch.equal(got, x)
    assert erased > 0


def test_probability_zero_never_erases():
    x = _normalised((3, 32, 48))
    ours = RandomErasing(probability=0.0, seed=0)
    for _ in range(50):
        assert torch.equal(ours(x), x)


def test_erased_region_is_the_box_and_in_bounds():
    x = _normalised((3, 32, 48))
    ours = RandomErasing(probability=1.0, mode="pixel")
    for s in SEEDS:
        boxes = ours.sample_boxes(32, 48, random.Random(s))
        assert len(boxes) == 1
        top, left, h, w = boxes[0]
        assert 0 <= top and top + h <= 32 and 0 <= left and left + w <= 48
        assert 0 < h < 32 and 0 < w < 48
        # Rounding of h and w moves the area a little off the sampled [0.02, 1/3] fraction.
        assert 0.01 <= h * w / (32 * 48) <= 0.4
        out = ours(x, random.Random(s), torch.Generator().manual_seed(s))
        mask = torch.zeros(32, 48, dtype=torch.bool)
        mask[top : top + h, left : left + w] = True
        changed = (out != x).any(0)
        assert torch.equal(changed, mask), f"seed {s}"


def test_input_is_not_modified_unless_inplace():
    x = _normalised((3, 32, 48))
    keep = x.clone()
    out = RandomErasing(probability=1.0, seed=0)(x)
    assert torch.equal(x, keep) and out is not x and not torch.equal(out, x)
    out = RandomErasing(probability=1.0, inplace=True, seed=0)(x)
    assert out is x and not torch.equal(x, keep)


def test_erasing_keeps_dtype_and_leaves_global_rng_alone():
    x = _normalised((2, 3, 16, 16)).to(torch.bfloat16)
    torch.manual_seed(5)
    before = torch.get_rng_state()
    out = RandomErasing(probability=1.0, seed=1)(x)
    assert out.dtype == torch.bfloat16 and out.shape == x.shape
    assert torch.equal(torch.get_rng_state(), before)
