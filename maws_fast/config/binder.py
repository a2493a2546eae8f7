"""From YAML files and ``--section.key=value`` overrides to a validated :class:`Config`, and
``maws-train --help-config``.

Nothing here knows a section by name: the keys, their types, defaults and help all come from the
dataclass tree (:mod:`maws_fast.config.schema`), and a value is converted to its field's annotated
type. Unknown keys, bad values and unreadable YAML raise :class:`~maws_fast.errors.ConfigError`
naming the key or the file position. Renamed keys (:mod:`maws_fast.config.renames`) are moved to
their new place with one note each.
"""
from __future__ import annotations

import dataclasses
import json
import math
import os
import sys
import types
import typing
from collections.abc import Callable
from pathlib import Path

from maws_fast.config.presets import PRESETS, check_preset
from maws_fast.config.renames import deprecation_note, rename_old_keys
from maws_fast.config.schema import Config, section_names, subsections
from maws_fast.errors import ConfigError

Echo = Callable[[str], None]


@dataclasses.dataclass(frozen=True)
class CliText:
    """An override value from the command line: the raw text and its YAML reading.

    String fields take the raw text (``--run.out_dir=0.10`` stays "0.10", not "0.1"); every
    other field takes the YAML reading (numbers, booleans, lists, null).
    """

    raw: str
    parsed: object


def _stderr_note(line: str) -> None:
    """Where a deprecation note goes unless told otherwise: stderr, from one process of a job
    (torchrun gives every rank its RANK; each reads the same config)."""
    if os.environ.get("RANK", "0") == "0":
        print(line, file=sys.stderr, flush=True)


def _coerce(value, tp, key: str):
    """Convert a YAML / CLI value to the field's annotated type, or raise naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, CliText):
        options = [a for a in args if a is not type(None)] if origin in (typing.Union, types.UnionType) else [tp]
        if str in options and not (value.parsed is None and type(None) in args):
            return value.raw
        value = value.parsed
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config: {key}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"config: {key}: expected a number, got {value!r}")
        try:
            out = tp(value) if not (tp is int and isinstance(value, float)) else None
        except (TypeError, ValueError):
            out = None
        if tp is int and isinstance(value, str):
            try:
                out = int(value)
            except ValueError:
                out = None
        if out is None or (tp is float and not math.isfinite(out)):
            raise ConfigError(f"config: {key}: expected {tp.__name__}, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config: {key}: expected a string, got {value!r}")
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.strip("[]()").split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and origin is list:
            value = [value]  # --eval.shots=5 means [5]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config: {key}: expected a list, got {value!r}")
        if origin is tuple:
            if len(args) != len(value):
                raise ConfigError(f"config: {key}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        return [_coerce(v.strip() if isinstance(v, str) else v, args[0], key) for v in value]
    return value


def _field_default(cls, name: str):
    f = next(f for f in dataclasses.fields(cls) if f.name == name)
    return f.default_factory() if f.default is dataclasses.MISSING else f.default


def _build(cls, data: dict, prefix: str, base=None):
    """``cls`` from ``data``; the fields ``data`` leaves out keep ``base``'s values (a section's own
    default: ``lit.augment`` starts from LiT's crop and flip, not the class's), or the class defaults."""
    if not isinstance(data, dict):
        raise ConfigError(f"config: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"config: unknown key {prefix}{unknown[0]}" + (f" (and {unknown[1:]})" if unknown[1:] else "")
            + f"; valid keys under {prefix.rstrip('.') or 'the top level'}: {sorted(names)} "
            + f"(`maws-train --help-config{' ' + prefix.split('.')[0] if prefix else ''}` explains each)"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            inner = getattr(base, name) if base is not None else _field_default(cls, name)
            kwargs[name] = _build(tp, value, f"{prefix}{name}.", inner)
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    try:
        return cls(**kwargs) if base is None else dataclasses.replace(base, **kwargs)
    except ConfigError as e:
        # a section shared by several parents names its keys relative to itself: put the path in front
        msg = str(e)
        if prefix and msg.startswith("config: ") and not msg.startswith(f"config: {prefix}"):
            sub = msg[len("config: "):]
            if not any(sub.startswith(f"{s}.") for s in section_names()):
                msg = f"config: {prefix}{sub}"
        raise ConfigError(msg) from None


def _renamed(tree: dict, met: list[str]) -> dict:
    out, old = rename_old_keys(tree)
    met += [k for k in old if k not in met]
    return out


def config_from_dict(data: dict, echo: Echo | None = None) -> Config:
    """Build and validate a Config. ``model.preset`` fills the model fields first; an old key
    (:data:`~maws_fast.config.renames.RENAMED`) is read as its new one, with a note to ``echo``
    (default: stderr)."""
    met: list[str] = []
    data = _renamed(data or {}, met)
    for old in met:
        (echo or _stderr_note)(deprecation_note(old))
    model = data.get("model", {})
    if isinstance(model, dict):
        preset = model.get("preset", "tiny")
        preset = preset.raw if isinstance(preset, CliText) else preset
        check_preset(preset)
        data["model"] = {**PRESETS[preset](), **model, "preset": preset}
    return _build(Config, data, "")


def parse_overrides(args: list[str]) -> dict:
    """``["--mae.epochs=2", "--run.stages", "mae,wsp"]`` -> nested dict (values parsed as YAML)."""
    import yaml

    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"config: cannot parse argument {arg!r}; overrides look like --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"config: override --{key} has no value; write --{key}=VALUE")
            value = args[i + 1]
            i += 1
        if "." not in key:
            raise ConfigError(f"config: override --{key} must name a section and key, e.g. --mae.epochs=2")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        parsed = CliText(value, parsed)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config: override --{key} conflicts with an earlier override")
        node[parts[-1]] = parsed
        i += 1
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _type_name(tp) -> str:
    """How --help-config spells a field's type (YAML words: null, lists)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return getattr(tp, "__name__", str(tp))


def config_help(section: str | None = None) -> str:
    """Every config field, or one section's (with its nested sections: ``data`` shows ``data.dali``
    too; ``data.dali`` alone also works), with its type, default and help (``maws-train --help-config``)."""
    sections = {name: (f, cls) for name, f, cls in subsections(Config)}
    if section and section not in sections:
        raise ConfigError(f"config: no section {section!r}; sections are {sorted(sections)}")
    defaults = Config()
    blocks = []
    for name, (f, cls) in sections.items():
        if section and name != section and not name.startswith(f"{section}."):
            continue
        inst = defaults
        for part in name.split("."):
            inst = getattr(inst, part)
        sub = typing.get_type_hints(cls)
        rows = [(f"--{name}.{g.name}", _type_name(sub[g.name]), json.dumps(getattr(inst, g.name)), g.metadata["help"])
                for g in dataclasses.fields(cls) if not dataclasses.is_dataclass(sub[g.name])]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        blocks.append("\n".join([f"{name}: {f.metadata['help']}"]
                                + [f"  {k:<{widths[0]}}  {t:<{widths[1]}}  {d:<{widths[2]}}  {h}" for k, t, d, h in rows]))
    return "\n\n".join(blocks)


def _yaml_error(path: Path, e: Exception) -> ConfigError:
    """PyYAML's several-line report as one line: file, line and column, and what is wrong there."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    what = ": ".join(w for w in (getattr(e, "context", None), getattr(e, "problem", None)) if w) \
        or str(e).splitlines()[0]
    fix = "indent with spaces: YAML does not allow tabs" if "'\\t'" in what else "fix the file"
    return ConfigError(f"config: {where}: not valid YAML ({what}); {fix} (or set the value with --section.key=value)")


def load_config(path: str | Path | None, overrides: list[str] | None = None, echo: Echo | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply CLI overrides.

    Args:
        path: the YAML file, or None for the defaults.
        overrides: ``--section.key=value`` arguments, applied over the file.
        echo: where the one-line note of each renamed key used goes (default: stderr, from rank 0).
    """
    import yaml

    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: file {p} does not exist; pass --config PATH to a YAML file (e.g. configs/demo_fmnist.yaml)")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise _yaml_error(p, e) from None
        except UnicodeDecodeError:
            raise ConfigError(f"config: {p} is not a text (UTF-8) file; pass --config PATH to a YAML file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config: {p} must hold a mapping of sections ({', '.join(section_names())})")
    # renamed keys: each source on its own, so an override under an old name still beats the file
    met: list[str] = []
    merged = _merge(_renamed(data, met), _renamed(parse_overrides(overrides or []), met))
    for old in met:
        (echo or _stderr_note)(deprecation_note(old))
    return config_from_dict(merged, echo)
