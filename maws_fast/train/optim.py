"""AdamW parameter groups: MAE's weight-decay exclusions, and the fine-tune's layer-wise lr decay.

No decay on 1-D parameters (norm weights, biases), on anything named ``*.bias`` and on a learned
``pos_embed`` (WSP's: timm's ViT lists it in ``no_weight_decay``, as the fine-tune rule does); the
(1, 1, D) cls / mask tokens ARE decayed (they are 3-D), as in the official recipe. Frozen
parameters (the fixed sin-cos pos-embeds) are left out of the optimizer entirely.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from maws_fast.config import OptimConfig


def param_groups(model: nn.Module, weight_decay: float) -> list[dict]:
    """Two groups: ``decay`` (>= 2-D weights and tokens) and ``no_decay`` (1-D params, biases, a learned
    ``pos_embed``)."""
    decay, no_decay = [], []
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        (no_decay if p.ndim <= 1 or name.endswith(".bias") or name == "pos_embed" else decay).append(p)
    return [
        {"params": decay, "weight_decay": weight_decay, "name": "decay"},
        {"params": no_decay, "weight_decay": 0.0, "name": "no_decay"},
    ]


def _vit_layer_id(name: str, num_layers: int) -> int:
    """BEiT / MAE layer of a ViT parameter: embeddings 0, block i -> i + 1, everything else the top."""
    if name in ("cls_token", "pos_embed") or name.startswith("patch_embed"):
        return 0
    if name.startswith("blocks."):
        return int(name.split(".")[1]) + 1
    return num_layers


def layer_decay_groups(model: nn.Module, weight_decay: float, layer_decay: float) -> list[dict]:
    """Layer-wise lr decay param groups as the official MAE fine-tune's ``param_groups_lrd``.

    With L = len(model.blocks) + 1 layers, a parameter in layer i (:func:`_vit_layer_id`: cls token,
    pos-embed and patch embed 0, block i i + 1, the rest -- final norms, head -- L) gets
    ``lr_scale = layer_decay ** (L - i)``; 1-D parameters, ``pos_embed`` and ``cls_token`` get no
    weight decay. One group per (layer, decay) pair in first-seen order, named
    ``layer_<i>_decay`` / ``layer_<i>_no_decay``, each ``{"params", "lr_scale", "weight_decay", "name"}``:
    every engine applies ``lr * lr_scale`` to the group, to the step and the decay alike.
    """
    num_layers = len(model.blocks) + 1
    groups: dict[str, dict] = {}
    for name, p in model.named_parameters():
        if not p.requires_grad:
            continue
        no_decay = p.ndim == 1 or name in ("pos_embed", "cls_token")
        layer = _vit_layer_id(name, num_layers)
        key = f"layer_{layer}_{'no_decay' if no_decay else 'decay'}"
        if key not in groups:
            groups[key] = {"params": [], "lr_scale": layer_decay ** (num_layers - layer),
                           "weight_decay": 0.0 if no_decay else weight_decay, "name": key}
        groups[key]["params"].append(p)
    return list(groups.values())


def build_optimizer(model: nn.Module, cfg: OptimConfig, device: torch.device) -> torch.optim.AdamW:
    """AdamW over ``param_groups``; the fused CUDA implementation where the params are on a GPU."""
    kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
    return torch.optim.AdamW(
        param_groups(model, cfg.weight_decay), lr=cfg.abs_lr, betas=(cfg.beta1, cfg.beta2), **kwargs
    )
