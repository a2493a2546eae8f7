"""The fine-tune's RandAugment + RandomErasing inside the loaders: after the crop and flip (PIL loader:
on each decoded image; reference loader: on the uint8 crops), erasing on the normalised batch, each
sample a pure function of its seed (exact resume), off unless asked for; the DALI pipeline's own are
tested in test_dali_randaug.py."""
import itertools
import random

import numpy as np
import pytest
import torch

from maws_fast.data.batching import FinetuneAugment, TrainAugment
from maws_fast.data.pil_loader import PilLoader
from maws_fast.data.reference import BatchLoader
from maws_fast.data.shards import ShardWriter
from maws_fast.data.sources import open_source
from maws_fast.errors import ConfigError
from maws_fast.seeds import Stream, mix_seed

MEAN, STD = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
FT = dict(rand_aug="rand-m9-mstd0.5-inc1", reprob=0.25)


def _first(loader, epoch=0, n=2):
    it = loader.epoch(epoch, 0)
    out = [x.clone() for x, _ in itertools.islice(it, n)]
    it.close()
    return out


def _source(tmp_path, real_images):
    w = ShardWriter(tmp_path / "s", 3)
    for i, (key, data) in enumerate(sorted(real_images.items())):
        w.write(f"{i:06d}", data, {"label": i % 2, "src": key})
    w.finish()
    return open_source("webdataset", tmp_path / "s")


def test_pil_loader_applies_them_deterministically(tmp_path, real_images):
    src = _source(tmp_path, real_images)
    mk = lambda **kw: PilLoader(src, batch_size=3, seed=5, mean=MEAN, std=STD, targets="label",  # noqa: E731
                                transform=TrainAugment(32, (0.3, 1.0), **kw))
    plain, aug_a, aug_b = _first(mk()), _first(mk(**FT)), _first(mk(**FT))
    assert all(torch.equal(a, b) for a, b in zip(aug_a, aug_b))  # a function of (seed, epoch, batch, rank, i)
    assert not all(torch.equal(a, p) for a, p in zip(aug_a, plain))
    # the same crop + flip underneath: RandAugment and erasing are applied on top of the plain batch
    ld = mk(**FT)
    x_plain = plain[0]
    u8 = (x_plain * torch.tensor(STD).view(1, 3, 1, 1) + torch.tensor(MEAN).view(1, 3, 1, 1)).mul(255).round()
    px = [a.astype(np.uint8) for a in u8.clamp(0, 255).permute(0, 2, 3, 1).numpy()]
    want = ld.extras.images(px, 5, 0, 0, 0)
    want = (torch.from_numpy(np.stack(want)).permute(0, 3, 1, 2).float() / 255 - ld.mean) / ld.std
    want = ld.extras.tensors(want, 5, 0, 0, 0)
    torch.testing.assert_close(aug_a[0], want, rtol=0, atol=1e-6)


def test_reference_loader_applies_them_per_sample_and_per_rank(seeded):
    imgs = torch.randint(0, 256, (16, 28, 28), dtype=torch.uint8)
    y = torch.arange(16) % 10
    aug = {"out_size": 28, "scale": (0.3, 1.0), "flip_p": 0.5}
    extras = FinetuneAugment(TrainAugment(28, (0.3, 1.0), **FT), [0.286])
    mk = lambda e, shard=(0, 1): BatchLoader(imgs, y, 8, 3, 0.286, 0.353, augment=aug, extras=e,  # noqa: E731
                                              shard=shard)
    plain, ft, again = _first(mk(None)), _first(mk(extras)), _first(mk(extras))
    assert all(torch.equal(a, b) for a, b in zip(ft, again))
    changed = [not torch.equal(a[i], p[i]) for a, p in zip(ft, plain) for i in range(8)]
    assert sum(changed) >= 8  # RandAugment picks two ops at p=0.5 each: most images change
    halves = [_first(mk(extras, (r, 2)))[0] for r in range(2)]  # each rank: its rows of the same global batch
    assert torch.equal(torch.cat(halves), ft[0])


def test_erasing_alone_draws_its_boxes_from_the_sample_seed():
    extras = FinetuneAugment(TrainAugment(16, reprob=1.0), MEAN)
    x = torch.zeros(4, 3, 16, 16)
    out = extras.tensors(x, seed=9, epoch=1, batch=2, rank=0)
    for i in range(4):
        s = mix_seed(Stream.ERASE, 9, 1, 2, 0, i)
        (top, left, h, w), = extras.erase.sample_boxes(16, 16, random.Random(s))
        hit = out[i].abs().sum(0) > 0
        assert hit[top:top + h, left:left + w].all() and hit.sum() == h * w
    assert torch.equal(x, torch.zeros(4, 3, 16, 16))  # not in place


def test_off_by_default_bad_policy_and_both_jpeg_loaders_take_them(tmp_path, real_images):
    assert not TrainAugment(32).has_extras
    with pytest.raises(ConfigError, match="rand"):
        TrainAugment(32, rand_aug="rand-q9")
    from maws_fast.config import load_config
    from maws_fast.data.loader import jpeg_loader

    src = _source(tmp_path, real_images)
    for kind in ("pil", "dali"):
        if kind == "dali":
            pytest.importorskip("nvidia.dali")
        cfg = load_config(None, ["--data.dataset=jpeg", f"--data.loader={kind}", f"--data.train={tmp_path}",
                                 "--model.in_chans=3", "--data.mean=[0.5,0.5,0.5]", "--data.std=[0.5,0.5,0.5]"])
        ld = jpeg_loader(cfg, src, 3, (0.3, 1.0), 0.5, "label", torch.device("cpu"), **FT)
        assert ld.extras.randaug is not None and ld.extras.erase.probability == 0.25, kind
        assert FinetuneAugment.for_transform(ld.transform, [0.5] * 3) is not None
        ld.close()
