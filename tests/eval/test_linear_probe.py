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


def test_lars_step_by_hand():
    from maws_fast.eval.linear_probe import LARS

    w = torch.nn.Parameter(torch.tensor([[3.0, 4.0]]))  # ||w|| = 5
    b = torch.nn.Parameter(torch.tensor([1.0]))
    z = torch.nn.Parameter(torch.zeros(1, 2))  # zero norm: no rescale (q = 1)
    w.grad, b.grad, z.grad = torch.tensor([[0.0, 1.0]]), torch.tensor([2.0]), torch.tensor([[1.0, 1.0]])
    opt = LARS([w, b, z], lr=0.5, weight_decay=0.1, trust_coefficient=0.001)
    opt.step()
    d = torch.tensor([[0.3, 1.4]])  # g + wd * w
    q = 0.001 * 5.0 / d.norm()
    torch.testing.assert_close(w.data, torch.tensor([[3.0, 4.0]]) - 0.5 * q * d)
    torch.testing.assert_close(b.data, torch.tensor([1.0 - 0.5 * 2.0]))  # 1-D: no decay, no rescale
    torch.testing.assert_close(z.data, -0.5 * torch.tensor([[1.0, 1.0]]))
    w.grad = torch.tensor([[0.0, 1.0]])
    before = w.data.clone()
    opt.step()  # momentum 0.9: mu = 0.9 * mu + d'
    d2 = torch.tensor([[0.0, 1.0]]) + 0.1 * before
    mu = 0.9 * q * d + 0.001 * before.norm() / d2.norm() * d2
    torch.testing.assert_close(w.data, before - 0.5 * mu)


def test_warmup_then_cosine_schedule():
    from maws_fast.eval.linear_probe import _lr_at

    assert _lr_at(0, 10, 90, 1.0, 10) == 0.0
    assert _lr_at(50, 10, 90, 1.0, 10) == pytest.approx(0.5)  # half way through warmup
    assert _lr_at(100, 10, 90, 1.0, 10) == pytest.approx(1.0)
    assert _lr_at(500, 10, 90, 1.0, 10) == pytest.approx(0.5)  # half way through the cosine
    assert _lr_at(0, 10, 90, 1.0, 0) == 1.0


def test_lars_probe_learns_separable_features():
    g = torch.Generator().manual_seed(0)
    centers = torch.randn(4, 16, generator=g) * 3
    y = torch.randint(0, 4, (800,), generator=g)
    x = centers[y] + torch.randn(800, 16, generator=g)
    res = linear_probe(x[:600], y[:600], x[600:], y[600:], num_classes=4, epochs=20, batch_size=64, lr=6.4,
                       optimizer="lars", warmup_epochs=2)
    assert res["top1"] > 0.95
    with pytest.raises(ConfigError, match="not sgd or lars"):
        linear_probe(x[:600], y[:600], x[600:], y[600:], num_classes=4, epochs=2, optimizer="adam")
