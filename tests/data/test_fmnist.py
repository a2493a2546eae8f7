"""Fashion-MNIST loading (real files from dataset-fashion-mnist) and the weak-hashtag process."""

from __future__ import annotations

import gzip
import os
import shutil

import pytest
import torch

from maws_fast.data import fmnist
from maws_fast.data.fmnist import (
    CLASSES,
    DEFAULT_ROOT,
    MEAN,
    STD,
    VOCAB,
    load_fmnist,
    make_weak_hashtags,
    tag_targets,
)
from maws_fast.errors import DataError

from conftest import needs_fmnist  # noqa: E402

pytestmark = needs_fmnist


@pytest.fixture(scope="module")
def train() -> tuple[torch.Tensor, torch.Tensor]:
    return load_fmnist(None, "train")


def test_train_split_loads(train):
    images, labels = train
    assert images.shape == (60000, 28, 28) and images.dtype == torch.uint8
    assert labels.shape == (60000,) and labels.dtype == torch.int64
    assert torch.equal(torch.bincount(labels, minlength=10), torch.full((10,), 6000))
    # The module's pixel statistics are those of these images.
    # (from a histogram of the 256 pixel values: exact and much cheaper than a float copy)
    hist = torch.bincount(images.reshape(-1), minlength=256).double()
    vals = torch.arange(256, dtype=torch.float64) / 255
    mean = (hist * vals).sum() / hist.sum()
    std = ((hist * (vals - mean) ** 2).sum() / hist.sum()).sqrt()
    assert abs(mean.item() - MEAN) < 5e-4
    assert abs(std.item() - STD) < 5e-4


def test_test_split_loads():
    images, labels = load_fmnist(DEFAULT_ROOT, "test")
    assert images.shape == (10000, 28, 28)
    assert labels.shape == (10000,)
    assert int(labels.min()) == 0 and int(labels.max()) == 9
    assert len(CLASSES) == 10 and CLASSES[0] == "T-shirt/top" and CLASSES[9] == "Ankle boot"


def test_bad_split():
    with pytest.raises(DataError, match="split"):
        load_fmnist(None, "val")


def test_missing_dir(tmp_path):
    with pytest.raises(DataError, match="apt-get install dataset-fashion-mnist"):
        load_fmnist(str(tmp_path / "nope"), "train")


def test_missing_file_is_named(tmp_path):
    shutil.copy(os.path.join(DEFAULT_ROOT, "t10k-images-idx3-ubyte.gz"), tmp_path)
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*apt-get install"):
        load_fmnist(str(tmp_path), "test")


def _copy_test_split(dst) -> None:
    for name in ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"):
        shutil.copy(os.path.join(DEFAULT_ROOT, name), dst)


def test_truncated_gzip_names_file(tmp_path):
    _copy_test_split(tmp_path)
    path = tmp_path / "t10k-images-idx3-ubyte.gz"
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    with pytest.raises(DataError, match="t10k-images-idx3-ubyte.gz"):
        load_fmnist(str(tmp_path), "test")


def test_not_gzip_names_file(tmp_path):
    _copy_test_split(tmp_path)
    (tmp_path / "t10k-labels-idx1-ubyte.gz").write_bytes(b"this is not gzip data at all")
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz"):
        load_fmnist(str(tmp_path), "test")


def test_bad_magic(tmp_path):
    _copy_test_split(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = bytearray(gzip.decompress(path.read_bytes()))
    raw[3] = 0x03  # 2049 -> 2051
    path.write_bytes(gzip.compress(bytes(raw)))
    with pytest.raises(DataError, match="magic.*t10k|t10k.*magic"):
        load_fmnist(str(tmp_path), "test")


def test_short_payload(tmp_path):
    # A valid gzip stream whose IDX payload is shorter than its header says.
    _copy_test_split(tmp_path)
    path = tmp_path / "t10k-labels-idx1-ubyte.gz"
    raw = gzip.decompress(path.read_bytes())
    path.write_bytes(gzip.compress(raw[:-10]))
    with pytest.raises(DataError, match="t10k-labels-idx1-ubyte.gz.*truncated"):
        load_fmnist(str(tmp_path), "test")


# ----------------------------------------------------------------------------- weak hashtags


def test_vocab():
    assert VOCAB[:10] == (
        "tshirt", "trouser", "pullover", "dress", "coat",
        "sandal", "shirt", "sneaker", "bag", "ankle_boot",
    )  # fmt: skip
    assert VOCAB[10:] == ("top", "footwear", "legwear_dress", "accessory")


def test_hashtags_deterministic(train):
    images, labels = train
    a = make_weak_hashtags(images, labels, 500, seed=3)
    b = make_weak_hashtags(images, labels, 500, seed=3)
    c = make_weak_hashtags(images, labels, 500, seed=4)
    assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])
    assert not torch.equal(a[0], c[0]) and not torch.equal(a[1], c[1])
    assert a[0].shape == (500, 28, 28) and a[0].dtype == torch.uint8
    assert a[1].shape == (500, len(VOCAB)) and a[1].dtype == torch.float32


def _true_tags(labels: torch.Tensor, sources: torch.Tensor) -> torch.Tensor:
    """Recomputes the true tags of each sample from its sources, the slow obvious way."""
    super_of = {}
    for j, members in enumerate(fmnist.SUPER_TAGS.values()):
        for tag in members:
            super_of[VOCAB.index(tag)] = 10 + j
    lab_of = labels.tolist()
    rows, cols = [], []
    for i, row in enumerate(sources.tolist()):
        for s in row:
            if s >= 0:
                rows += [i, i]
                cols += [lab_of[s], super_of[lab_of[s]]]
    true = torch.zeros(sources.shape[0], len(VOCAB), dtype=torch.bool)
    true[rows, cols] = True
    return true


def test_mosaic_cells_are_pooled_sources(train):
    images, labels = train
    mosaics, _, sources, full = make_weak_hashtags(images, labels, 300, seed=7, return_sources=True)
    k = (sources >= 0).sum(dim=1)
    assert torch.equal(full, k == 1)
    assert set(k.tolist()) == {1, 2, 3, 4}
    for i in range(300):
        if full[i]:
            assert torch.equal(mosaics[i], images[sources[i, 0]])
            continue
        for c in range(4):
            r0, c0 = 14 * (c // 2), 14 * (c % 2)
            cell = mosaics[i, r0 : r0 + 14, c0 : c0 + 14]
            s = int(sources[i, c])
            if s < 0:
                assert int(cell.abs().sum()) == 0
            else:
                src = images[s].to(torch.float64)
                pooled = torch.nn.functional.avg_pool2d(src[None, None], 2)[0, 0]
                expected = torch.floor(pooled + 0.5).to(torch.uint8)  # round half up
                assert torch.equal(cell, expected)


def test_tag_noise_rates(train):
    images, labels = train
    num, drop_p, wrong_p = 20000, 0.3, 0.1
    _, tags, sources, _ = make_weak_hashtags(
        images, labels, num, seed=11, drop_p=drop_p, wrong_p=wrong_p, return_sources=True
    )
    tags = tags.bool()
    true = _true_tags(labels, sources)
    assert bool(tags.sum(dim=1).ge(1).all())  # never tagless

    # Wrong tags: at most one per sample, on a fraction wrong_p of samples.
    wrong = (tags & ~true).sum(dim=1)
    assert int(wrong.max()) == 1
    assert abs(wrong.float().mean().item() - wrong_p) < 0.01  # sd ~0.002

    # Dropped true tags: a sample with t true tags keeps 0.7 t + 0.3^t on average (keep-one
    # rule), so the expected dropped fraction is sum(0.3 t - 0.3^t) / sum(t).
    t = true.sum(dim=1).double()
    kept = (tags & true).sum(dim=1).double()
    assert bool((kept >= 1).all())
    expected = (drop_p * t - drop_p**t).sum() / t.sum()
    measured = 1 - kept.sum() / t.sum()
    assert abs(measured.item() - expected.item()) < 0.01  # sd ~0.0015
    assert measured.item() < drop_p  # the keep-one rule only ever restores tags


def test_no_noise_gives_true_tags(train):
    images, labels = train
    _, tags, sources, _ = make_weak_hashtags(
        images[:1000], labels[:1000], 400, seed=0, drop_p=0.0, wrong_p=0.0, return_sources=True
    )
    assert torch.equal(tags.bool(), _true_tags(labels[:1000], sources))


def test_tag_targets():
    tags = torch.tensor([[1.0, 0, 1, 0], [0, 0, 0, 1], [0, 0, 0, 0]])
    t = tag_targets(tags)
    assert torch.allclose(t[:2].sum(dim=1), torch.ones(2))
    assert torch.allclose(t[0], torch.tensor([0.5, 0, 0.5, 0]))
    assert torch.equal(t[2], torch.zeros(4))  # no NaN for a tagless row
