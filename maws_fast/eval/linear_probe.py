"""Linear probe on frozen, precomputed features (MAE's linear-probing recipe).

MAE (He et al., 2022, appendix A.2) puts a ``BatchNorm1d(affine=False)`` in front of the
linear head: MAE features are not normalised and their scale varies a lot across dimensions,
and the parameter-free BN fixes that without changing the probe's capacity (an affine-free
BN followed by a linear layer is still a linear classifier of the raw features).
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn

from maws_fast.errors import ConfigError


def validate_features(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
) -> None:
    """Check that a train/test feature split is usable by a probe.

    Args:
        train_x: Train features, shape (N, D).
        train_y: Train labels, integer shape (N,).
        test_x: Test features, shape (M, D).
        test_y: Test labels, integer shape (M,).
        num_classes: Number of classes; labels must lie in [0, num_classes).

    Raises:
        ConfigError: On empty inputs, wrong ranks/dtypes, mismatched lengths or feature
            dims, or labels outside [0, num_classes).
    """
    if not isinstance(num_classes, int) or num_classes < 2:
        raise ConfigError(f"num_classes must be an integer >= 2, got {num_classes!r}")
    for name, x, y in (("train", train_x, train_y), ("test", test_x, test_y)):
        if x.dim() != 2:
            raise ConfigError(f"{name}_x must have shape (N, D), got {tuple(x.shape)}")
        if y.dim() != 1:
            raise ConfigError(f"{name}_y must have shape (N,), got {tuple(y.shape)}")
        if x.shape[0] == 0 or x.shape[1] == 0:
            raise ConfigError(f"{name}_x is empty (shape {tuple(x.shape)})")
        if x.shape[0] != y.shape[0]:
            raise ConfigError(
                f"{name}_x has {x.shape[0]} rows but {name}_y has {y.shape[0]} labels"
            )
        if y.dtype.is_floating_point or y.dtype.is_complex or y.dtype == torch.bool:
            raise ConfigError(f"{name}_y must be an integer tensor, got {y.dtype}")
        lo, hi = int(y.min()), int(y.max())
        if lo < 0 or hi >= num_classes:
            raise ConfigError(
                f"{name}_y has labels in [{lo}, {hi}], outside [0, {num_classes}) "
                f"for num_classes={num_classes}"
            )
    if train_x.shape[1] != test_x.shape[1]:
        raise ConfigError(
            f"train_x has feature dim {train_x.shape[1]} but test_x has {test_x.shape[1]}"
        )


def _make_probe(dim: int, num_classes: int, generator: torch.Generator) -> nn.Sequential:
    # momentum=None -> cumulative average of batch stats. The features are frozen, so their
    # distribution is stationary and the exact running mean beats an EMA that still remembers
    # its (0, 1) init after a short probe.
    bn = nn.BatchNorm1d(dim, affine=False, eps=1e-6, momentum=None)
    head = nn.Linear(dim, num_classes)
    with torch.no_grad():
        # MAE's head init: small weights so the initial logits are ~0 (uniform predictions).
        head.weight.normal_(0.0, 0.01, generator=generator)
        head.bias.zero_()
    return nn.Sequential(bn, head)


class LARS(torch.optim.Optimizer):
    """LARS as the official MAE linear probe uses it (MoCo v3's): SGD with momentum whose update of
    each >= 2-D parameter is rescaled by ``trust * ||p|| / ||g + wd * p||`` (1 where either norm is
    0); 1-D parameters (biases, norm affines) get neither the rescale nor weight decay."""

    def __init__(self, params, lr: float = 0.0, weight_decay: float = 0.0, momentum: float = 0.9,
                 trust_coefficient: float = 0.001):
        super().__init__(params, dict(lr=lr, weight_decay=weight_decay, momentum=momentum,
                                      trust_coefficient=trust_coefficient))

    @torch.no_grad()
    def step(self, closure=None):
        for g in self.param_groups:
            for p in g["params"]:
                d = p.grad
                if d is None:
                    continue
                if p.ndim > 1:
                    d = d.add(p, alpha=g["weight_decay"])
                    pn, un = torch.norm(p), torch.norm(d)
                    one = torch.ones_like(pn)
                    d = d.mul(torch.where(pn > 0, torch.where(un > 0, g["trust_coefficient"] * pn / un, one), one))
                mu = self.state[p].setdefault("mu", torch.zeros_like(p))
                mu.mul_(g["momentum"]).add_(d)
                p.add_(mu, alpha=-g["lr"])


def _lr_at(step: int, steps_per_epoch: int, epochs: int, lr: float, warmup_epochs: float) -> float:
    """Per-step lr: linear warmup over ``warmup_epochs`` then a half cosine to 0 (the official
    lr_sched rule on fractional epochs); without warmup, a cosine over all steps."""
    if warmup_epochs <= 0:
        return 0.5 * lr * (1.0 + math.cos(math.pi * step / (epochs * steps_per_epoch)))
    t = step / steps_per_epoch
    if t < warmup_epochs:
        return lr * t / warmup_epochs
    return 0.5 * lr * (1.0 + math.cos(math.pi * (t - warmup_epochs) / (epochs - warmup_epochs)))


@torch.no_grad()
def _accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor, batch_size: int) -> float:
    model.eval()
    correct = 0
    for i in range(0, x.shape[0], batch_size):
        logits = model(x[i : i + batch_size])  # (B, C)
        correct += int((logits.argmax(dim=1) == y[i : i + batch_size]).sum())
    return correct / x.shape[0]


def _batches(perm: torch.Tensor, batch_size: int) -> list[torch.Tensor]:
    chunks = list(perm.split(batch_size))
    # BatchNorm cannot normalise a batch of one in train mode; fold a lone leftover example
    # into the previous batch instead of dropping it.
    if len(chunks) > 1 and chunks[-1].numel() == 1:
        chunks[-2] = torch.cat([chunks[-2], chunks.pop()])
    return chunks


def linear_probe(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    epochs: int = 90,
    batch_size: int = 256,
    lr: float = 0.1,
    weight_decay: float = 0.0,
    seed: int = 0,
    optimizer: str = "sgd",
    warmup_epochs: float = 0.0,
) -> dict:
    """Train a BN + linear classifier on frozen features and report top-1 accuracy.

    Optimiser: ``"sgd"``, SGD with momentum 0.9 (the standard linear-probe choice of MoCo v3 and
    DINO; unlike AdamW its result does not depend on per-coordinate second-moment tricks, so the
    probe measures the features rather than the optimiser), or ``"lars"``, the official MAE
    probe's (:class:`LARS`: momentum 0.9, trust 0.001). The lr warms up linearly over
    ``warmup_epochs`` (official: 10) and follows a half cosine to 0 per step. No weight decay by
    default, as in MAE.

    Args:
        train_x: Train features, float (N, D).
        train_y: Train labels, integer (N,), in [0, num_classes).
        test_x: Test features, float (M, D).
        test_y: Test labels, integer (M,), in [0, num_classes).
        num_classes: Number of classes.
        epochs: Passes over the training set.
        batch_size: Mini-batch size for training and evaluation.
        lr: Peak learning rate (start of the cosine schedule).
        weight_decay: SGD weight decay (L2) on the head.
        seed: Seeds head init and shuffling; same inputs and seed give the same result.
        optimizer: ``"sgd"`` or ``"lars"``.
        warmup_epochs: linear lr warmup before the cosine, in epochs (fractions allowed).

    Returns:
        ``{"top1": test accuracy in [0, 1], "train_top1": train accuracy in [0, 1],
        "epochs": epochs, "num_train": N}``.

    Raises:
        ConfigError: On invalid features/labels (see :func:`validate_features`) or
            non-positive ``epochs``/``batch_size``/``lr`` or negative ``weight_decay``.
    """
    validate_features(train_x, train_y, test_x, test_y, num_classes)
    if epochs < 1:
        raise ConfigError(f"epochs must be >= 1, got {epochs}")
    if batch_size < 2:
        raise ConfigError(f"batch_size must be >= 2 (BatchNorm needs 2 samples), got {batch_size}")
    if not lr > 0:
        raise ConfigError(f"lr must be > 0, got {lr}")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")
    if optimizer not in ("sgd", "lars"):
        raise ConfigError(f"probe optimizer {optimizer!r} is not sgd or lars")
    if not 0 <= warmup_epochs < epochs:
        raise ConfigError(f"warmup_epochs must be in [0, epochs={epochs}), got {warmup_epochs}")
    n = train_x.shape[0]
    if n < 2:
        raise ConfigError(f"linear_probe needs at least 2 training examples, got {n}")

    train_x = train_x.detach().float().cpu()  # (N, D)
    test_x = test_x.detach().float().cpu()  # (M, D)
    train_y = train_y.detach().long().cpu()  # (N,)
    test_y = test_y.detach().long().cpu()  # (M,)

    gen = torch.Generator().manual_seed(seed)
    model = _make_probe(train_x.shape[1], num_classes, gen)
    # The BN has no parameters, so only the head is optimised (and weight-decayed).
    if optimizer == "lars":
        opt = LARS(model.parameters(), lr=lr, weight_decay=weight_decay)
    else:
        opt = torch.optim.SGD(model.parameters(), lr=lr, momentum=0.9, weight_decay=weight_decay)

    steps_per_epoch = len(_batches(torch.arange(n), batch_size))
    step = 0
    for _ in range(epochs):
        model.train()
        for idx in _batches(torch.randperm(n, generator=gen), batch_size):
            cur_lr = _lr_at(step, steps_per_epoch, epochs, lr, warmup_epochs)
            for group in opt.param_groups:
                group["lr"] = cur_lr
            logits = model(train_x[idx])  # (B, C)
            loss = F.cross_entropy(logits, train_y[idx])
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()
            step += 1

    return {
        "top1": _accuracy(model, test_x, test_y, batch_size),
        "train_top1": _accuracy(model, train_x, train_y, batch_size),
        "epochs": epochs,
        "num_train": n,
    }
