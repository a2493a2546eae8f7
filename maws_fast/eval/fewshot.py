"""k-shot evaluation on frozen features: logistic regression on a few examples per class."""

from __future__ import annotations

import torch
import torch.nn.functional as F

from maws_fast.errors import ConfigError
from maws_fast.eval.linear_probe import validate_features


def sample_shots(
    labels: torch.Tensor, num_classes: int, shots: int, generator: torch.Generator
) -> torch.Tensor:
    """Pick exactly ``shots`` random examples of every class, without replacement.

    Args:
        labels: Integer labels, shape (N,), in [0, num_classes).
        num_classes: Number of classes; every class must have >= ``shots`` examples.
        shots: Examples to draw per class.
        generator: Source of randomness (same generator state -> same indices).

    Returns:
        Long tensor of shape (num_classes * shots,) of indices into ``labels``, grouped by
        class: entries ``[c * shots, (c + 1) * shots)`` all have label ``c``.

    Raises:
        ConfigError: If ``shots < 1``, a label is outside [0, num_classes), or some class
            has fewer than ``shots`` examples.
    """
    if shots < 1:
        raise ConfigError(f"shots must be >= 1, got {shots}")
    labels = labels.long().cpu()
    if labels.numel() > 0 and (int(labels.min()) < 0 or int(labels.max()) >= num_classes):
        raise ConfigError(f"labels must lie in [0, {num_classes}) for num_classes={num_classes}")
    counts = torch.bincount(labels, minlength=num_classes)  # (C,)
    short = (counts < shots).nonzero().flatten()
    if short.numel() > 0:
        c = int(short[0])
        raise ConfigError(
            f"class {c} has only {int(counts[c])} training examples, fewer than shots={shots}"
        )
    # One shuffle + one stable sort by label instead of a per-class nonzero loop: O(N log N)
    # regardless of num_classes, and inside each class the order is the random one.
    perm = torch.randperm(labels.shape[0], generator=generator)  # (N,)
    _, order = torch.sort(labels[perm], stable=True)  # (N,)
    starts = torch.cumsum(counts, 0) - counts  # (C,) first sorted position of each class
    pos = starts[:, None] + torch.arange(shots)  # (C, shots)
    return perm[order[pos.flatten()]]  # (C * shots,)


def _fit_logreg(
    x: torch.Tensor, y: torch.Tensor, num_classes: int, steps: int, weight_decay: float
) -> tuple[torch.Tensor, torch.Tensor]:
    """Full-batch multinomial logistic regression with an L2 penalty on the weights.

    LBFGS: the problem is small (C * shots rows) and convex, so a quasi-Newton solver reaches
    the optimum in tens of iterations where Adam would need hundreds, and with a zero init
    the result is fully deterministic (no init randomness at all).
    """
    w = torch.zeros(x.shape[1], num_classes, requires_grad=True)  # (D, C)
    b = torch.zeros(num_classes, requires_grad=True)  # (C,)
    opt = torch.optim.LBFGS(
        [w, b], lr=1.0, max_iter=steps, history_size=10, line_search_fn="strong_wolfe"
    )

    def closure() -> torch.Tensor:
        opt.zero_grad(set_to_none=True)
        # The bias is not penalised, as in sklearn's LogisticRegression.
        loss = F.cross_entropy(x @ w + b, y) + 0.5 * weight_decay * w.pow(2).sum()
        loss.backward()
        return loss

    with torch.enable_grad():
        opt.step(closure)
    return w.detach(), b.detach()


def fewshot(
    train_x: torch.Tensor,
    train_y: torch.Tensor,
    test_x: torch.Tensor,
    test_y: torch.Tensor,
    num_classes: int,
    shots: int = 5,
    trials: int = 5,
    seed: int = 0,
    steps: int = 100,
    weight_decay: float = 1e-3,
) -> dict:
    """k-shot top-1 accuracy of a logistic regression on frozen features, over several trials.

    Each trial draws ``shots`` examples per class from the train split with
    ``torch.Generator().manual_seed(seed + trial)``, centres features on the support-set
    mean and L2-normalises them (the usual few-shot "CL2N" transform: it removes the shared
    feature offset that otherwise dominates cosine geometry), fits the classifier on the
    support set, and scores the whole test split.

    Args:
        train_x: Train features, float (N, D); the pool the support sets are drawn from.
        train_y: Train labels, integer (N,), in [0, num_classes).
        test_x: Test features, float (M, D).
        test_y: Test labels, integer (M,), in [0, num_classes).
        num_classes: Number of classes.
        shots: Support examples per class per trial.
        trials: Number of independent support-set draws.
        seed: Base seed; trial ``t`` uses ``seed + t``.
        steps: Maximum LBFGS iterations per trial.
        weight_decay: L2 penalty ``0.5 * weight_decay * ||W||^2`` added to the mean
            cross-entropy (features are unit-norm, so this sets the logit scale).

    Returns:
        ``{"top1_mean", "top1_std" (population std over trials), "per_trial": [top-1 per
        trial], "shots", "trials"}``, accuracies in [0, 1].

    Raises:
        ConfigError: On invalid features/labels, non-positive ``shots``/``trials``/``steps``,
            negative ``weight_decay``, or a class with fewer than ``shots`` train examples.
    """
    validate_features(train_x, train_y, test_x, test_y, num_classes)
    if trials < 1:
        raise ConfigError(f"trials must be >= 1, got {trials}")
    if steps < 1:
        raise ConfigError(f"steps must be >= 1, got {steps}")
    if weight_decay < 0:
        raise ConfigError(f"weight_decay must be >= 0, got {weight_decay}")

    train_x = train_x.detach().float().cpu()  # (N, D)
    test_x = test_x.detach().float().cpu()  # (M, D)
    train_y = train_y.detach().long().cpu()  # (N,)
    test_y = test_y.detach().long().cpu()  # (M,)

    per_trial: list[float] = []
    for trial in range(trials):
        gen = torch.Generator().manual_seed(seed + trial)
        idx = sample_shots(train_y, num_classes, shots, gen)  # (C * shots,)
        sx, sy = train_x[idx], train_y[idx]  # (S, D), (S,)
        mean = sx.mean(dim=0, keepdim=True)  # (1, D)
        sx = F.normalize(sx - mean, dim=1)
        qx = F.normalize(test_x - mean, dim=1)  # (M, D)
        w, b = _fit_logreg(sx, sy, num_classes, steps, weight_decay)
        pred = (qx @ w + b).argmax(dim=1)  # (M,)
        per_trial.append(float((pred == test_y).float().mean()))

    accs = torch.tensor(per_trial, dtype=torch.float64)
    return {
        "top1_mean": float(accs.mean()),
        "top1_std": float(accs.std(correction=0)),
        "per_trial": per_trial,
        "shots": shots,
        "trials": trials,
    }
