"""The reference BatchLoader: resumable determinism, worker independence, eval order, validation."""

from __future__ import annotations

import pytest
import torch

from maws_fast.data.reference import BatchLoader
from maws_fast.errors import ConfigError, DataError

N, H = 70, 12
AUG = {"scale": (0.3, 1.0), "flip_p": 0.5, "out_size": 10}


@pytest.fixture(scope="module")
def data() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    images = torch.randint(0, 256, (N, H, H), dtype=torch.uint8, generator=g)
    # Target i is i, so a batch's targets reveal which samples it holds.
    return images, torch.arange(N)


def _loader(data, **kw) -> BatchLoader:
    args = dict(batch_size=8, seed=3, mean=0.3, std=0.4, augment=AUG)
    args.update(kw)
    return BatchLoader(data[0], data[1], **args)


def _batches(loader: BatchLoader, epoch: int, start: int = 0) -> list:
    return list(loader.epoch(epoch, start_batch=start))


def test_shapes_and_len(data):
    ld = _loader(data)
    assert ld.num_batches == len(ld) == N // 8
    batches = _batches(ld, 0)
    assert len(batches) == 8
    x, y = batches[0]
    assert x.shape == (8, 1, 10, 10) and x.dtype == torch.float32
    assert y.shape == (8,)
    # An epoch visits distinct samples.
    seen = torch.cat([y for _, y in batches])
    assert len(set(seen.tolist())) == 64


def test_resume_is_bit_identical(data):
    ld = _loader(data)
    full = _batches(ld, 1)
    resumed = _batches(_loader(data), 1, start=3)  # a fresh loader, as after a restart
    assert len(resumed) == len(full) - 3
    for (xa, ya), (xb, yb) in zip(full[3:], resumed):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)
    assert _batches(ld, 1, start=ld.num_batches) == []  # resuming at the very end: nothing left


def test_workers_do_not_change_batches(data):
    serial = _batches(_loader(data, num_workers=0), 2)
    parallel = _batches(_loader(data, num_workers=2), 2)
    assert len(serial) == len(parallel)
    for (xa, ya), (xb, yb) in zip(serial, parallel):
        assert torch.equal(xa, xb) and torch.equal(ya, yb)


def test_epochs_and_seeds_differ(data):
    ld = _loader(data)
    assert not torch.equal(ld.order(0), ld.order(1))
    assert torch.equal(ld.order(4), _loader(data).order(4))
    assert not torch.equal(ld.order(0), _loader(data, seed=4).order(0))
    assert sorted(ld.order(0).tolist()) == list(range(N))
    # Same samples in two batches of different epochs still get different augmentation.
    a = _batches(_loader(data, shuffle=False), 0)[0][0]
    b = _batches(_loader(data, shuffle=False), 1)[0][0]
    assert not torch.equal(a, b)


def test_eval_mode_order_and_normalisation(data):
    images, targets = data
    ld = _loader(data, augment=None, shuffle=False, drop_last=False, batch_size=16)
    batches = _batches(ld, 0)
    assert ld.num_batches == 5 and len(batches) == 5
    assert [len(y) for _, y in batches] == [16, 16, 16, 16, 6]  # partial last batch
    x = torch.cat([x for x, _ in batches])
    assert torch.equal(torch.cat([y for _, y in batches]), targets)
    assert x.shape == (N, 1, H, H)
    ref = (images.float() / 255 - 0.3) / 0.4
    assert torch.allclose(x[:, 0], ref, atol=1e-5)
    # Eval batches do not depend on the epoch.
    assert torch.equal(_batches(ld, 7)[2][0], batches[2][0])


def test_no_targets_and_channels():
    images = torch.randint(0, 256, (10, 3, 8, 8), dtype=torch.uint8)
    ld = BatchLoader(images, None, batch_size=4, seed=0, mean=[0.1, 0.2, 0.3], std=0.5)
    batches = _batches(ld, 0)
    assert len(batches) == 2
    assert all(y is None for _, y in batches)
    assert batches[0][0].shape == (4, 3, 8, 8)


def test_validation(data):
    images, targets = data
    with pytest.raises(DataError, match="empty"):
        BatchLoader(images[:0], None, batch_size=4, seed=0, mean=0.5, std=0.5)
    with pytest.raises(DataError, match="batch_size must be >= 1"):
        _loader(data, batch_size=0)
    with pytest.raises(DataError, match="zero batches"):
        _loader(data, batch_size=N + 1)
    assert _loader(data, batch_size=N + 1, drop_last=False).num_batches == 1
    with pytest.raises(DataError, match="targets"):
        BatchLoader(images, targets[:5], batch_size=4, seed=0, mean=0.5, std=0.5)
    with pytest.raises(DataError, match="uint8"):
        BatchLoader(images.float(), None, batch_size=4, seed=0, mean=0.5, std=0.5)
    with pytest.raises(ConfigError, match="out_size"):
        _loader(data, augment={"scale": (0.5, 1.0), "colour": 1})
    ld = _loader(data)
    for bad in (-1, ld.num_batches + 1):
        with pytest.raises(DataError, match="start_batch"):
            _batches(ld, 0, start=bad)
