"""Softmax cross-entropy against soft targets (WSP: the multi-hot divided by its tag count).

``loss = mean_b( -sum_v targets[b, v] * log_softmax(logits[b])[v] )``. Rows of ``targets`` sum to
1, so the gradient is ``(softmax(logits) - targets) / B``.
"""
from __future__ import annotations

import torch

from maws_kernels._backend import resolve_backend

_IMPLEMENTED = ("torch",)


def soft_target_cross_entropy_ref(logits: torch.Tensor, targets: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """Reference: (B, V) logits, (B, V) targets -> scalar mean loss (fp16/bf16 upcast to fp32 when upcast)."""
    if upcast and logits.element_size() < 4:
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(targets.to(logp.dtype) * logp).sum(dim=-1).mean()


def soft_target_cross_entropy(logits: torch.Tensor, targets: torch.Tensor, backend: str | None = None) -> torch.Tensor:
    """Soft-target cross-entropy of (B, V) logits against (B, V) targets whose rows sum to 1."""
    if logits.dim() != 2 or targets.shape != logits.shape:
        raise ValueError(f"logits and targets must both be (B, V); got {tuple(logits.shape)} and {tuple(targets.shape)}")
    resolve_backend("soft_target_cross_entropy", backend, _IMPLEMENTED, logits.device)
    return soft_target_cross_entropy_ref(logits, targets)
