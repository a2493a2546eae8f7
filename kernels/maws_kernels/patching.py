"""``patch_timm(model)``: put the maws_kernels modules into a timm VisionTransformer, in place.

What is swapped, each only where ours computes exactly what timm's does:

* every ``nn.LayerNorm`` over one dim (timm's ``LayerNorm`` subclass included; no other subclass,
  e.g. timm's channels-first ``LayerNorm2d``) -> :class:`maws_kernels.nn.LayerNorm`;
* every timm ``Attention`` without the extras ours lacks (q/k norms, a scale norm, a gate, attention
  dropout in training) -> :class:`maws_kernels.nn.Attention` (non-causal, unmasked; a call with a
  mask raises);
* every timm ``Mlp`` with an exact GELU, no hidden norm and no dropout -> :class:`maws_kernels.nn.Mlp`
  (fc1's bias and the GELU in one kernel).

The new modules hold the old ones' parameters and sub-modules (the same tensors), so weights,
``state_dict`` keys and an optimizer built before the patch are untouched. Hooks registered on a
replaced module are not carried over: patch before wrapping the model (DDP, FSDP, compile).

timm itself is never imported here: modules are recognised by class name, defining module and
attributes, and one that holds any parameter or sub-module ours lacks is kept, so this file works
with whatever timm the user has, or none.
"""
from __future__ import annotations

import torch.nn as nn

from maws_kernels.nn import ATTENTION_BACKENDS, Attention, LayerNorm, Mlp


# The timm modules these stand in for, by (class name, defining modules): other timm models have
# classes of the same names with other arithmetic (BEiT's Attention adds q / v biases and a relative
# position bias; LayerNorm2d normalises channels first), which are never touched.
_TIMM_ATTENTION = ("Attention", ("timm.layers.attention", "timm.models.vision_transformer"))
_TIMM_MLP = ("Mlp", ("timm.layers.mlp",))
_TIMM_LAYER_NORM = ("LayerNorm", ("timm.layers.norm",))
_ATTENTION_CHILDREN = {"qkv", "q_norm", "k_norm", "attn_drop", "norm", "proj", "proj_drop"}
_MLP_CHILDREN = {"fc1", "act", "drop1", "norm", "fc2", "drop2"}


def _is(m: nn.Module, kind: tuple[str, tuple[str, ...]]) -> bool:
    return type(m).__name__ == kind[0] and type(m).__module__ in kind[1]


def _only(m: nn.Module, children: set[str], params: set[str]) -> str | None:
    """Why ``m`` holds more than the named children and parameters (None if it does not)."""
    extra = sorted({n for n, _ in m.named_children()} - children)
    if extra:
        return f"it has sub-modules {extra} the replacement lacks"
    extra = sorted({n for n, _ in m.named_parameters()} - params)
    return f"it has parameters {extra} the replacement lacks" if extra else None


def _is_timm_attention(m: nn.Module) -> str | None:
    """None when ``m`` is a timm Attention ours can stand in for; else why not (or "" if not one)."""
    if not _is(m, _TIMM_ATTENTION) or not (hasattr(m, "qkv") and hasattr(m, "proj")):
        return ""
    if not (isinstance(m.qkv, nn.Linear) and isinstance(m.proj, nn.Linear)):
        return "its qkv / proj are not nn.Linear"
    if getattr(m, "head_dim", None) is None or m.num_heads * m.head_dim != m.qkv.out_features // 3:
        return "its head layout is not qkv = 3 x heads x head_dim"
    if m.qkv.in_features != m.proj.out_features or m.proj.in_features != m.qkv.out_features // 3:
        return "its output width differs from its input width"
    if abs(getattr(m, "scale", m.head_dim ** -0.5) - m.head_dim ** -0.5) > 1e-12:
        return "its scale is not head_dim ** -0.5"
    for name in ("q_norm", "k_norm", "norm"):
        if not isinstance(getattr(m, name, nn.Identity()), nn.Identity):
            return f"it has a {name}"
    if getattr(m, "gate", None) is not None:
        return "it is gated"
    drop = getattr(m, "attn_drop", None)
    if drop is not None and getattr(drop, "p", 0.0) > 0:
        return f"it has attention dropout {drop.p}"
    proj_drop = getattr(m, "proj_drop", None)
    if proj_drop is not None and getattr(proj_drop, "p", 0.0) > 0:
        return f"it has projection dropout {proj_drop.p}"
    return _only(m, _ATTENTION_CHILDREN, {"qkv.weight", "qkv.bias", "proj.weight", "proj.bias"})


def _is_timm_mlp(m: nn.Module) -> str | None:
    if not _is(m, _TIMM_MLP) or not (hasattr(m, "fc1") and hasattr(m, "fc2") and hasattr(m, "act")):
        return ""
    if not (isinstance(m.fc1, nn.Linear) and isinstance(m.fc2, nn.Linear)):
        return "its fc1 / fc2 are not nn.Linear (a conv Mlp?)"
    if type(m.act) is not nn.GELU or m.act.approximate != "none":
        return f"its activation is {m.act!r}, not the exact GELU"
    if not isinstance(getattr(m, "norm", nn.Identity()), nn.Identity):
        return "it has a hidden norm"
    for name in ("drop1", "drop2"):
        d = getattr(m, name, None)
        if d is not None and getattr(d, "p", 0.0) > 0:
            return f"it has dropout {d.p}"
    return _only(m, _MLP_CHILDREN, {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"})


def patch_timm(model: nn.Module, *, norms: bool = True, attention: bool = True, mlp: bool = True,
               backend: str | None = None, attn_backend: str | None = None) -> dict[str, nn.Module]:
    """Swap a timm ViT's norms, attention and MLP for maws_kernels modules, in place.

    Args:
        model: a timm ``VisionTransformer`` (or any module holding timm blocks).
        norms, attention, mlp: which kinds to swap.
        backend: maws_kernels backend of the LayerNorm and bias-GELU ops (None = best for the device).
        attn_backend: one of :data:`maws_kernels.nn.ATTENTION_BACKENDS`, or None (ours on a GPU
            where Triton is installed, torch's SDPA elsewhere).

    Returns:
        ``{qualified name: the module that was replaced}`` (so a caller can count, log or undo).

    Raises:
        ValueError: nothing in ``model`` could be swapped (not a timm ViT?); the message says what
            was found and why each candidate was kept.
    """
    if attn_backend is not None and attn_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"patch_timm: unknown attn_backend {attn_backend!r}; choose one of {ATTENTION_BACKENDS}")
    replaced, kept = {}, {}
    for name, module in list(model.named_modules()):
        if not name:
            continue
        new, why = None, ""
        if norms and isinstance(module, nn.LayerNorm) and not isinstance(module, LayerNorm):
            if type(module) is not nn.LayerNorm and not _is(module, _TIMM_LAYER_NORM):
                why = f"it is a {type(module).__name__}, a LayerNorm with its own forward"
            elif len(module.normalized_shape) != 1:
                why = "it normalises over more than one dim"
            else:
                new = LayerNorm.from_module(module, backend=backend)
        elif attention and not isinstance(module, Attention):
            why = _is_timm_attention(module)
            if why is None:
                new = Attention.from_module(module, backend=attn_backend)
        if new is None and mlp and not isinstance(module, Mlp) and not why:
            why = _is_timm_mlp(module)
            if why is None:
                new = Mlp.from_module(module, backend=backend)
        if new is not None:
            parent_name, _, child = name.rpartition(".")
            setattr(model.get_submodule(parent_name) if parent_name else model, child, new)
            replaced[name] = module
        elif why:
            kept[name] = why
    if not replaced:
        found = "; ".join(f"{n}: {w}" for n, w in list(kept.items())[:4]) or "no LayerNorm, Attention or Mlp"
        raise ValueError(f"patch_timm: nothing in this {type(model).__name__} could be swapped ({found}); "
                         "it expects a timm VisionTransformer")
    return replaced
