"""AdamW with MAE's weight-decay exclusions.

No decay on 1-D parameters (norm weights, biases) and on anything named ``*.bias``; the
(1, 1, D) cls / mask tokens ARE decayed (they are 3-D), as in the official recipe. Frozen
parameters (the fixed sin-cos pos-embeds) are left out of the optimizer entirely.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from maws_fast.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: ``decay`` (>= 2-D weights and tokens) and ``no_decay`` (1-D params, biases)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the fused CUDA implementation where the params are on a GPU."""
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.abs_lr, betas=(cfg.beta1, cfg.beta2), **kwargs
    )
