"""Checkpoints: safetensors weights + JSON metadata, written atomically.

Layout of one checkpoint directory::

    step_00000200/
        model.safetensors   # model state dict (timm / official MAE keys)
        optim.safetensors   # optimizer tensors, keys "state.<param index>.<name>" (absent in exports)
        meta.json           # step, config fingerprint, optimizer param groups, file sizes, ...

A checkpoint is built in a hidden temporary directory next to its final place, every file is
fsync'ed, and the directory is renamed into place in one ``os.rename``: a crash, a full disk or a
kill leaves either the previous checkpoints or the complete new one, never a torn one.
``meta.json`` records the byte size of each file, so a file damaged later is detected on load.
"""
from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from maws_fast.errors import CheckpointError, UserError

FORMAT_VERSION = 1


def _fsync_dir(path: Path) -> None:
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj: dict) -> None:
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def _write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    # safetensors needs contiguous, unshared CPU tensors
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small text file atomically (temp file in the same directory, then rename)."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def optimizer_tensors(optimizer: torch.optim.Optimizer) -> tuple[dict[str, torch.Tensor], list[dict]]:
    """Split an optimizer state dict into tensors (for safetensors) and JSON-able param groups."""
    sd = optimizer.state_dict()
    tensors = {}
    for idx, state in sd["state"].items():
        for name, value in state.items():
            tensors[f"state.{idx}.{name}"] = value if torch.is_tensor(value) else torch.tensor(value)
    groups = [{k: (list(v) if isinstance(v, tuple) else v) for k, v in g.items()} for g in sd["param_groups"]]
    return tensors, groups


def load_optimizer_tensors(optimizer: torch.optim.Optimizer, tensors: dict[str, torch.Tensor], groups: list[dict]) -> None:
    state: dict[int, dict] = {}
    for key, value in tensors.items():
        _, idx, name = key.split(".", 2)
        state.setdefault(int(idx), {})[name] = value
    groups = [{k: (tuple(v) if k == "betas" else v) for k, v in g.items()} for g in groups]
    try:
        optimizer.load_state_dict({"state": state, "param_groups": groups})
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"optimizer state in the checkpoint does not fit this model: {e}") from None


def save_checkpoint(
    directory: str | Path,
    name: str,
    model_state: dict[str, torch.Tensor],
    meta: dict,
    optimizer: torch.optim.Optimizer | None = None,
    keep: int | None = None,
) -> Path:
    """Write checkpoint ``directory/name`` atomically and return its path.

    Args:
        directory: parent directory (created if needed).
        name: checkpoint directory name, e.g. ``step_00000200`` or ``final``.
        model_state: tensors to store in model.safetensors.
        meta: JSON-able metadata (step, config fingerprint, ...).
        optimizer: also store its state (for resuming).
        keep: after writing, delete all but the newest ``keep`` ``step_*`` checkpoints.
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / name
    tmp = directory / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        _write_tensors(tmp / "model.safetensors", model_state)
        meta = {**meta, "format_version": FORMAT_VERSION}
        if optimizer is not None:
            tensors, groups = optimizer_tensors(optimizer)
            _write_tensors(tmp / "optim.safetensors", tensors)
            meta["optimizer_param_groups"] = groups
        meta["files"] = {p.name: p.stat().st_size for p in tmp.iterdir()}
        _write_json(tmp / "meta.json", meta)
        _fsync_dir(tmp)
        if final.exists():
            # Replacing an existing checkpoint of the same name (re-export): move the old one aside
            # first; only after the new one is in place is the old one deleted.
            old = directory / f".old-{name}-{uuid.uuid4().hex[:8]}"
            os.rename(final, old)
            os.rename(tmp, final)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(tmp, final)
        _fsync_dir(directory)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as SafetensorError
        raise UserError(f"could not write checkpoint {final}: {getattr(e, 'strerror', None) or e}; free disk space or choose "
                        f"another --run.out_dir (earlier checkpoints are untouched)") from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    if keep is not None:
        steps = list_checkpoints(directory)
        for old in steps[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    return final


def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete ``step_*`` checkpoints under ``directory``, oldest first (temp dirs are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step_"))


def read_meta(path: str | Path) -> dict:
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise CheckpointError(f"{path} is not a checkpoint: meta.json is missing") from None
    except json.JSONDecodeError as e:
        raise CheckpointError(f"{path}/meta.json is corrupt ({e}); delete {path} to fall back to an earlier checkpoint") from None
    for fname, size in meta.get("files", {}).items():
        f = path / fname
        if fname != "meta.json" and (not f.exists() or f.stat().st_size != size):
            raise CheckpointError(
                f"{f} is missing or truncated (expected {size} bytes); delete {path} to fall back to an earlier checkpoint"
            )
    return meta


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning every failure into one CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict, dict[str, torch.Tensor] | None]:
    """Returns (model tensors, meta, optimizer tensors or None) of checkpoint directory ``path``."""
    path = Path(path)
    meta = read_meta(path)
    model = load_tensors(path / "model.safetensors")
    optim = load_tensors(path / "optim.safetensors") if (path / "optim.safetensors").exists() else None
    return model, meta, optim


def config_diff(saved: dict, current: dict, prefix: str = "") -> list[str]:
    """Dotted keys whose values differ between two nested config dicts."""
    out = []
    for k in sorted(set(saved) | set(current)):
        a, b = saved.get(k), current.get(k)
        if isinstance(a, dict) and isinstance(b, dict):
            out += config_diff(a, b, f"{prefix}{k}.")
        elif a != b:
            out.append(f"{prefix}{k}: {a!r} -> {b!r}")
    return out
