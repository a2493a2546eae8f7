"""Tests for maws_fast.eval.linear_probe."""

import pytest
import torch

from maws_fast.errors import ConfigError
from maws_fast.eval.linear_probe import linear_probe


def _separable(n: int, num_classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    means = torch.randn(num_classes, dim, generator=torch.Generator().manual_seed(123)) * 5.0
    y = torch.randint(0, num_classes, (n,), generator=g)
    x = means[y] + torch.randn(n, dim, generator=g)  # (N, D)
    # A large shared offset and per-dim scale, which the affine-free BN must absorb.
    return x * torch.linspace(0.1, 10.0, dim) + 100.0, y


def _noise(n: int, num_classes: int, dim: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randint(0, num_classes, (n,), generator=g)


KW = dict(epochs=5, batch_size=64, lr=0.1)


def test_separable_features_reach_full_accuracy() -> None:
    trx, try_ = _separable(1000, 10, 32, seed=0)
    tex, tey = _separable(1000, 10, 32, seed=1)
    out = linear_probe(trx, try_, tex, tey, num_classes=10, **KW)
    assert out["top1"] >= 0.99 and out["train_top1"] >= 0.99
    assert out["epochs"] == 5 and out["num_train"] == 1000


def test_noise_features_are_at_chance() -> None:
    trx, try_ = _noise(1000, 10, 32, seed=0)
    tex, tey = _noise(2000, 10, 32, seed=1)
    out = linear_probe(trx, try_, tex, tey, num_classes=10, **KW)
    assert abs(out["top1"] - 0.1) < 0.05
    assert out["train_top1"] > out["top1"]  # it fits train noise but that cannot transfer


def test_deterministic_given_seed() -> None:
    trx, try_ = _noise(300, 5, 16, seed=0)
    tex, tey = _noise(300, 5, 16, seed=1)
    a = linear_probe(trx, try_, tex, tey, 5, seed=3, **KW)
    b = linear_probe(trx, try_, tex, tey, 5, seed=3, **KW)
    assert a == b


def test_lone_last_example_is_handled() -> None:
    # 129 = 2 * 64 + 1: a batch of one would crash BatchNorm in train mode.
    trx, try_ = _separable(129, 3, 8, seed=0)
    out = linear_probe(trx, try_, trx, try_, 3, **KW)
    assert out["top1"] >= 0.99


@pytest.mark.parametrize(
    "mutate, match",
    [
        (lambda a: {**a, "train_y": a["train_y"][:-1]}, "rows but train_y"),
        (lambda a: {**a, "test_x": a["test_x"][:, :-1]}, "feature dim"),
        (lambda a: {**a, "train_y": a["train_y"] + 10}, "outside"),
        (lambda a: {**a, "test_y": a["test_y"] - 1}, "outside"),
        (lambda a: {**a, "train_x": a["train_x"][:0], "train_y": a["train_y"][:0]}, "empty"),
        (lambda a: {**a, "train_y": a["train_y"].float()}, "integer"),
        (lambda a: {**a, "epochs": 0}, "epochs"),
        (lambda a: {**a, "num_classes": 1}, "num_classes"),
    ],
)
def test_bad_input_raises_config_error(mutate, match: str) -> None:
    x, y = _noise(20, 3, 4, seed=0)
    args = dict(train_x=x, train_y=y, test_x=x, test_y=y, num_classes=3, epochs=1)
    with pytest.raises(ConfigError, match=match):
        linear_probe(**mutate(args))
