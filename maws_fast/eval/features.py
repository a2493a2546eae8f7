"""Frozen-backbone feature extraction for the probes in :mod:`maws_fast.eval`."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from maws_fast.errors import ConfigError


@torch.no_grad()
def extract_features(
    model: nn.Module,
    batches: Iterable[tuple[torch.Tensor, Any]],
    device: str | torch.device = "cpu",
) -> torch.Tensor:
    """Run ``model.forward_pooled`` over every batch and stack the pooled features.

    The model is put in eval mode for the duration (dropout off, BatchNorm/running stats
    frozen) and its previous train/eval mode is restored afterwards, even on error, so this
    can be called in the middle of a training loop.

    Args:
        model: Module with a ``forward_pooled(imgs) -> (B, D)`` method, already on ``device``.
        batches: Iterable of ``(imgs, _)`` tuples with ``imgs`` float of shape (B, C, H, W);
            the second element (labels, usually) is ignored.
        device: Device the images are moved to before the forward pass.

    Returns:
        Float32 tensor of shape (N, D) on CPU, N being the total number of images, in
        iteration order.

    Raises:
        ConfigError: If ``batches`` yields no batch.
    """
    was_training = model.training
    model.eval()
    feats: list[torch.Tensor] = []
    try:
        # inference_mode is stricter and faster than no_grad (no version counters / views
        # tracking); no_grad on the function keeps the clone below out of autograd too.
        with torch.inference_mode():
            for imgs, _ in batches:
                out = model.forward_pooled(imgs.to(device, non_blocking=True))  # (B, D)
                feats.append(out.float().cpu())
            if not feats:
                raise ConfigError("extract_features got no batches: the data loader is empty")
            stacked = torch.cat(feats, dim=0)  # (N, D)
    finally:
        model.train(was_training)
    # Clone outside inference mode so callers get a normal tensor: inference tensors cannot
    # be saved for backward, which would break e.g. a probe that trains on these features.
    return stacked.clone()
