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

Nothing is left alone silently: the returned :class:`PatchReport` names every candidate it kept and
why, and one line summarising it goes to the ``maws_kernels`` logger (WARNING when something was
kept, INFO otherwise). Logging, not ``warnings``, so a trainer's own logging config decides.
"""
from __future__ import annotations

import logging
from collections import Counter

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


logger = logging.getLogger("maws_kernels")


class PatchReport(dict):
    """What :func:`patch_timm` did: ``{qualified name: the module that was replaced}`` (a plain dict
    as before, so ``len()`` and indexing still work), plus what it left alone.

    Attributes:
        kept: ``{qualified name: why it was left alone}`` for every LayerNorm / timm Attention / timm
            Mlp of a kind asked for that could not be swapped exactly.
        counts: ``{"swapped": {kind: n}, "kept": {kind: n}}``, kind one of LayerNorm, Attention, Mlp.
    """

    def __init__(self, replaced: dict[str, nn.Module], kept: dict[str, str], kinds: dict[str, str]):
        super().__init__(replaced)
        self.kept = dict(kept)
        self.counts = {"swapped": dict(Counter(kinds[n] for n in replaced)),
                       "kept": dict(Counter(kinds[n] for n in kept))}

    def summary(self) -> str:
        """One line: the counts, then the modules kept for each reason, with the reason."""
        def by_kind(c: dict[str, int]) -> str:
            return ", ".join(f"{n} {k}" for k, n in c.items()) or "none"

        line = f"patch_timm: swapped {len(self)} modules ({by_kind(self.counts['swapped'])})"
        if not self.kept:
            return line + "; left none alone"
        groups: dict[str, list[str]] = {}
        for name, why in self.kept.items():
            groups.setdefault(why, []).append(name)
        # a ViT-B has 12 of each: name the first two and the count, not all twelve
        said = "; ".join(f"{', '.join(ns[:2])}{f' and {len(ns) - 2} more' if len(ns) > 2 else ''} ({why})"
                         for why, ns in groups.items())
        return line + f"; left {len(self.kept)} alone ({by_kind(self.counts['kept'])}): {said}"


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
        return f"attn_drop={drop.p} > 0: maws_kernels.nn.Attention has no attention dropout"
    proj_drop = getattr(m, "proj_drop", None)
    if proj_drop is not None and getattr(proj_drop, "p", 0.0) > 0:
        return f"proj_drop={proj_drop.p} > 0: maws_kernels.nn.Attention has no projection dropout"
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
            return f"{name}={d.p} > 0: maws_kernels.nn.Mlp has no dropout"
    return _only(m, _MLP_CHILDREN, {"fc1.weight", "fc1.bias", "fc2.weight", "fc2.bias"})


def patch_timm(model: nn.Module, *, norms: bool = True, attention: bool = True, mlp: bool = True,
               backend: str | None = None, attn_backend: str | None = None) -> PatchReport:
    """Swap a timm ViT's norms, attention and MLP for maws_kernels modules, in place.

    Args:
        model: a timm ``VisionTransformer`` (or any module holding timm blocks).
        norms, attention, mlp: which kinds to swap.
        backend: maws_kernels backend of the LayerNorm and bias-GELU ops (None = best for the device).
        attn_backend: one of :data:`maws_kernels.nn.ATTENTION_BACKENDS`, or None (ours on a GPU
            where Triton is installed, torch's SDPA elsewhere).

    Returns:
        A :class:`PatchReport`: ``{qualified name: the module that was replaced}`` (so a caller can
        count, log or undo), with ``.kept`` (``{name: why it was left alone}``), ``.counts`` and
        ``.summary()``, the line also logged to the ``maws_kernels`` logger.

    Raises:
        ValueError: nothing in ``model`` could be swapped (not a timm ViT?); the message says what
            was found and why each candidate was kept.
    """
    if attn_backend is not None and attn_backend not in ATTENTION_BACKENDS:
        raise ValueError(f"patch_timm: unknown attn_backend {attn_backend!r}; choose one of {ATTENTION_BACKENDS}")
    replaced, kept, kinds = {}, {}, {}
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
            kinds[name] = "LayerNorm"
        elif attention and not isinstance(module, Attention):
            why = _is_timm_attention(module)
            if why is None:
                new = Attention.from_module(module, backend=attn_backend)
            kinds[name] = "Attention"
        if new is None and mlp and not isinstance(module, Mlp) and not why:
            why = _is_timm_mlp(module)
            if why is None:
                new = Mlp.from_module(module, backend=backend)
            kinds[name] = "Mlp"
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
    report = PatchReport(replaced, kept, kinds)
    logger.log(logging.WARNING if kept else logging.INFO, report.summary())
    return report
