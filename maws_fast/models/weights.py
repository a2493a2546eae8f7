"""Loading released and our own weights into a model: the checkpoint's tensors found inside their
wrapper (:func:`unwrap_state_dict`), position embeddings of another patch grid fitted, and a
:class:`LoadReport` of what was loaded, dropped and left at its init (:func:`load_pretrained`,
:func:`load_encoder`).

Pure model code: no data, no torch.distributed.
"""
from __future__ import annotations

import math
from dataclasses import dataclass, field

import torch
import torch.nn as nn

from maws_fast.errors import CheckpointError
from maws_fast.models.pos_embed import resample_pos_embed


@dataclass
class LoadReport:
    """What :func:`load_pretrained` did with a checkpoint."""

    loaded: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)  # in the checkpoint, not in the model
    initialised: list[str] = field(default_factory=list)  # in the model, kept at its fresh init
    resampled: list[str] = field(default_factory=list)  # learned pos-embeds resized to the model's grid ("key g0 -> g")
    # fixed sin-cos tables of another grid ("key g0 -> g"): the model's own table is kept
    regenerated: list[str] = field(default_factory=list)

    def summary(self) -> str:
        def short(keys: list[str]) -> str:
            prefixes = sorted({k.split(".")[0] for k in keys})
            return ", ".join(prefixes) if prefixes else "none"

        out = (f"loaded {len(self.loaded)} tensors; dropped {len(self.dropped)} ({short(self.dropped)}); "
               f"initialised {len(self.initialised)} ({short(self.initialised)})")
        if self.resampled:
            out += f"; resampled bicubically: {', '.join(self.resampled)}"
        if self.regenerated:
            out += f"; sin-cos regenerated for the model's grid: {', '.join(self.regenerated)}"
        return out


WRAPPER_KEYS = ("model", "state_dict", "module")  # official MAE / lightning-style / DeepSpeed-style wrappers
PREFIXES = ("module.", "_orig_mod.")  # DDP and torch.compile wrappers in saved key names


def unwrap_state_dict(sd: dict) -> dict:
    """The model's tensors inside a checkpoint: ``{"model": sd}`` (official MAE), ``{"state_dict": sd}``
    or a bare state dict (ours, timm's, MAWS's), with a DDP ``module.`` or compile ``_orig_mod.``
    prefix on every key removed. Non-tensor entries (an epoch, args) are left out."""
    for key in WRAPPER_KEYS:
        if isinstance(sd.get(key), dict):
            sd = sd[key]
            break
    sd = {k: v for k, v in sd.items() if isinstance(v, torch.Tensor)}
    for prefix in PREFIXES:
        if sd and all(k.startswith(prefix) for k in sd):
            sd = {k[len(prefix):]: v for k, v in sd.items()}
    return sd


POS_EMBED_KEYS = ("pos_embed", "decoder_pos_embed")


def _fit_pos_embeds(model: nn.Module, sd: dict, own: dict) -> tuple[dict, list[str], dict[str, str]]:
    """``sd`` with each position embedding of another patch grid made to fit ``model``'s grid.

    A learned table is resampled (:func:`resample_pos_embed`, the official rule); a fixed sin-cos
    one is dropped from ``sd``, the model keeping the table it built for its own grid. Tables that
    cannot be fitted (another width, not a square grid) are left for the shape check to report.
    Returns (state dict, what was resampled, {regenerated key: what}), each "key g0xg0 -> gxg".
    """
    grid = getattr(getattr(model, "patch_embed", None), "grid_size", None)
    if grid is None:
        return sd, [], {}
    params = dict(model.named_parameters())
    sd, resampled, regenerated = dict(sd), [], {}
    for key in POS_EMBED_KEYS:
        if key not in sd or key not in own or sd[key].shape == own[key].shape:
            continue
        src, dst = sd[key], own[key]
        extra = dst.shape[-2] - grid * grid
        if src.ndim != 3 or dst.ndim != 3 or src.shape[-1] != dst.shape[-1] or extra < 0:
            continue
        try:
            fitted = resample_pos_embed(src, grid, extra)
        except ValueError:
            continue
        g0 = math.isqrt(src.shape[-2] - extra)
        what = f"{key} {g0}x{g0} -> {grid}x{grid}"
        if key in params and not params[key].requires_grad:
            del sd[key]
            regenerated[key] = what
        else:
            sd[key] = fitted
            resampled.append(what)
    return sd, resampled, regenerated


def load_pretrained(model: nn.Module, state_dict: dict, strict: bool = False, source: str = "checkpoint") -> LoadReport:
    """Load matching keys of ``state_dict`` into ``model`` and say what was dropped / initialised.

    Every shared key must have the same shape: a mismatch raises CheckpointError naming the keys
    (a silent partial load would train a different model than the one asked for). The one
    exception is a position embedding of another patch grid (a checkpoint of another resolution):
    a learned table is resampled bicubically as the official MAE does, a fixed sin-cos table is the
    model's own for its grid; the report lists both.

    Args:
        model: the destination module.
        state_dict: source tensors (a bare state dict or ``{"model": ...}``).
        strict: also fail when a key is dropped or left initialised.
        source: name of the checkpoint for messages.
    """
    sd = unwrap_state_dict(state_dict)
    own = model.state_dict()
    sd, resampled, regenerated = _fit_pos_embeds(model, sd, own)
    # in the model's own key order, so the message starts where the model does (cls_token, ...)
    bad = [f"{k}: checkpoint {tuple(sd[k].shape)} vs model {tuple(v.shape)}" for k, v in own.items() if k in sd and sd[k].shape != v.shape]
    if bad:
        raise CheckpointError(
            f"{source} does not fit the model; shape mismatch in {len(bad)} key(s): " + "; ".join(bad[:8])
            + (" ..." if len(bad) > 8 else "") + ". Use the model config the checkpoint was trained with."
        )
    report = LoadReport(
        loaded=[k for k in sd if k in own],
        dropped=[k for k in sd if k not in own],
        initialised=[k for k in own if k not in sd and k not in regenerated],
        resampled=resampled,
        regenerated=list(regenerated.values()),
    )
    if strict and (report.dropped or report.initialised):
        raise CheckpointError(
            f"{source} does not match the model: unexpected keys {report.dropped[:8]}, missing keys {report.initialised[:8]}"
        )
    with torch.no_grad():
        for k in report.loaded:
            own[k].copy_(sd[k])
    return report


def load_encoder(model: nn.Module, state_dict: dict, source: str, new: tuple[str, ...] = (),
                 hint: str = "") -> LoadReport:
    """:func:`load_pretrained` that refuses a checkpoint leaving any of the model's tensors at their
    fresh init except those in ``new`` (a head, a fine-tune's ``fc_norm``): a file that fits nothing
    would otherwise train or probe a random encoder under another one's name. ``hint`` says what
    to point at instead."""
    report = load_pretrained(model, state_dict, source=source)
    missing = [k for k in report.initialised if k not in new]
    if missing:
        raise CheckpointError(f"{source} lacks encoder tensors {missing[:6]} ({len(missing)} in all); {hint}")
    return report
