"""Learning-rate schedule: linear warmup, then half-cycle cosine to ``min_lr``, set per iteration.

Same shape as the official MAE ``adjust_learning_rate``: the schedule is a function of the
fractional epoch ``step / steps_per_epoch``, so it does not depend on how a run was resumed.
"""
from __future__ import annotations

import math

import torch


def lr_at(epoch: float, base_lr: float, min_lr: float, warmup_epochs: float, epochs: float) -> float:
    """lr at fractional ``epoch``: ``base_lr * epoch / warmup`` during warmup, then cosine to ``min_lr``."""
    if epoch < warmup_epochs:
        return base_lr * epoch / warmup_epochs
    span = max(epochs - warmup_epochs, 1e-12)
    progress = min((epoch - warmup_epochs) / span, 1.0)
    return min_lr + (base_lr - min_lr) * 0.5 * (1.0 + math.cos(math.pi * progress))


def set_lr(optimizer: torch.optim.Optimizer, lr: float) -> None:
    """Apply ``lr`` to every param group (scaled by a group's ``lr_scale`` if it has one)."""
    for group in optimizer.param_groups:
        group["lr"] = lr * group.get("lr_scale", 1.0)
