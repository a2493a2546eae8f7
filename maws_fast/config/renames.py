"""Config keys renamed in this release, in one table. An old key keeps working (in a YAML file, on
the command line, in a saved config) with a one-line note, until the next release drops it and
this module."""
from __future__ import annotations

from maws_fast.errors import ConfigError

RENAMED = {
    # the DALI settings became one section, data.dali, which the DALI loader takes as is
    "data.dali_threads": "data.dali.threads",
    "data.hw_decoder_load": "data.dali.hw_decoder_load",
    "data.device_memory_padding": "data.dali.device_memory_padding",
    "data.host_memory_padding": "data.dali.host_memory_padding",
    "data.preallocate_width_hint": "data.dali.preallocate_width_hint",
    "data.preallocate_height_hint": "data.dali.preallocate_height_hint",
    "data.shuffle_buffer": "data.dali.shuffle_buffer",
    "data.dali_output": "data.dali.output",
    # every training stage's crop and flip became one section type, <stage>.augment
    "mae.crop_scale": "mae.augment.crop_scale",
    "mae.flip_p": "mae.augment.flip_p",
    "wsp.crop_scale": "wsp.augment.crop_scale",
    "wsp.flip_p": "wsp.augment.flip_p",
    "finetune.crop_scale": "finetune.augment.crop_scale",
    "finetune.flip_p": "finetune.augment.flip_p",
    "lit.crop_scale": "lit.augment.crop_scale",
    "lit.flip_p": "lit.augment.flip_p",
}


def deprecation_note(old: str) -> str:
    """The one line printed when ``old`` is used."""
    return f"[config] {old} is deprecated: use {RENAMED[old]} (the old key goes in the next release)"


def _copy(tree: dict) -> dict:
    return {k: _copy(v) if isinstance(v, dict) else v for k, v in tree.items()}


def rename_old_keys(tree: dict) -> tuple[dict, list[str]]:
    """``tree`` (one source's nested mapping: a YAML file, the overrides, a saved config) with each
    old key of :data:`RENAMED` moved to its new place, and the old keys it held, in table order.

    Each source is renamed on its own before sources are merged, so an override with an old key
    still wins over a YAML file with the new one. Both names in one source is an error.
    """
    out, met = _copy(tree), []
    for old, new in RENAMED.items():
        *path, leaf = old.split(".")
        node = out
        for p in path:
            node = node.get(p) if isinstance(node, dict) else None
        if not isinstance(node, dict) or leaf not in node:
            continue
        value = node.pop(leaf)
        *path, leaf = new.split(".")
        node = out
        for i, p in enumerate(path):
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config: {'.'.join(path[:i + 1])}: expected a mapping, got {node!r} (it holds "
                                  f"{new}, the new name of {old})")
        if leaf in node:
            raise ConfigError(f"config: {old} and {new} are both set; keep {new} ({old} is its old name)")
        node[leaf] = value
        met.append(old)
    return out, met
