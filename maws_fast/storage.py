"""Files that must never be torn: atomic writes, safetensors I/O and checkpoint directories.

The ground floor under both checkpoint formats (``maws_fast.parallel.checkpoint`` writes the
sharded one, the training loop the final single-process one) and under every small file a run
writes (config.json, results, metrics rewrites).

The single-process checkpoint format, one directory::

    step_00000200/ or final/
        model.safetensors   # model state dict (timm / official MAE keys)
        meta.json           # step, config fingerprint, file sizes, ...

A checkpoint is built in a hidden temporary directory next to its final place, every file is
fsync'ed, and the directory is renamed into place (:func:`replace_dir`): a crash, a full disk or
a kill leaves either the previous checkpoints or the complete new one, never a torn one.
``meta.json`` records the byte size of each file, so a file damaged later is detected on load.
"""
from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import uuid
import zlib
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from maws_fast.errors import CheckpointDamaged, CheckpointError, UserError

FORMAT_VERSION = 1


# --- atomic files ----------------------------------------------------------------------------------
def fsync_dir(path: Path) -> None:
    """Make a rename or a new file inside ``path`` durable."""
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj: dict) -> None:
    """Write ``obj`` as JSON and fsync it (the caller renames the directory it sits in)."""
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())


def write_tensors(path: Path, tensors: dict[str, torch.Tensor]) -> None:
    """Write a safetensors file and fsync it."""
    # safetensors needs contiguous, unshared CPU tensors
    save_file({k: v.detach().to("cpu").contiguous().clone() for k, v in tensors.items()}, str(path))
    with open(path, "rb") as f:
        os.fsync(f.fileno())


@contextlib.contextmanager
def atomic_file(path: str | Path):
    """Yield a temporary path beside ``path``; once the block has written it without raising, it is
    fsync'ed and renamed onto ``path`` (the directory fsync'ed too). On an exception the temporary
    file goes and ``path`` is untouched: a reader sees the old file or the complete new one, never a
    torn one. The temp name starts with a dot and ends in ``.tmp``, so listings skip it."""
    path = Path(path)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:8]}.tmp")
    try:
        yield tmp
        with open(tmp, "rb+") as f:
            os.fsync(f.fileno())
        os.replace(tmp, path)
        fsync_dir(path.parent)
    finally:
        tmp.unlink(missing_ok=True)


def atomic_write_text(path: str | Path, text: str) -> None:
    """Write a small text file atomically (:func:`atomic_file`)."""
    with atomic_file(path) as tmp:
        tmp.write_text(text, encoding="utf-8")


def replace_dir(tmp: Path, final: Path) -> None:
    """Rename the finished directory ``tmp`` to ``final``, replacing one that exists, then fsync.

    An existing ``final`` is moved aside first and deleted only once the new one is in place; if
    the rename fails, the old one is put back: a failed save leaves what was there.
    """
    if final.exists():
        old = final.parent / f".old-{final.name}-{uuid.uuid4().hex[:8]}"
        os.rename(final, old)
        try:
            os.rename(tmp, final)
        except OSError:
            os.rename(old, final)
            raise
        shutil.rmtree(old, ignore_errors=True)
    else:
        os.rename(tmp, final)
    fsync_dir(final.parent)


def write_failed(final: Path, e: Exception) -> UserError:
    """The one error a failed checkpoint write becomes (OSError, or safetensors' SafetensorError)."""
    return UserError(f"could not write checkpoint {final}: {getattr(e, 'strerror', None) or e}; free disk space or "
                     f"choose another --run.out_dir (earlier checkpoints are untouched)")


# --- reading ----------------------------------------------------------------------------------------
def list_checkpoints(directory: str | Path) -> list[Path]:
    """Complete ``step_*`` checkpoints under ``directory``, oldest first (temp dirs are ignored)."""
    directory = Path(directory)
    if not directory.is_dir():
        return []
    return sorted(p for p in directory.iterdir() if p.is_dir() and p.name.startswith("step_"))


def read_meta(path: str | Path) -> dict:
    """``meta.json`` of checkpoint ``path``, after checking every file it lists has its recorded size
    (and CRC-32, where the checkpoint recorded one). CheckpointDamaged says what is wrong."""
    path = Path(path)
    try:
        meta = json.loads((path / "meta.json").read_text())
    except FileNotFoundError:
        raise CheckpointDamaged(f"{path} is not a complete checkpoint: meta.json is missing") from None
    except (ValueError, OSError) as e:
        raise CheckpointDamaged(f"{path}/meta.json is corrupt ({e})") from None
    if not isinstance(meta, dict):
        raise CheckpointDamaged(f"{path}/meta.json is corrupt (it holds a {type(meta).__name__}, not an object)")
    for fname, size in meta.get("files", {}).items():
        f = path / fname
        if fname != "meta.json" and (not f.exists() or f.stat().st_size != size):
            raise CheckpointDamaged(f"{f} is missing or truncated (expected {size} bytes)")
    for fname, crc in meta.get("crc32", {}).items():
        check_crc32(path / fname, crc)
    return meta


def file_crc32(path: str | Path) -> int:
    """CRC-32 of a file's bytes, read in 16 MiB blocks."""
    crc = 0
    with open(path, "rb") as f:
        while block := f.read(1 << 24):
            crc = zlib.crc32(block, crc)
    return crc


def check_crc32(path: Path, expected: int) -> None:
    """CheckpointDamaged naming ``path`` when its bytes do not have the CRC-32 its checkpoint recorded."""
    try:
        got = file_crc32(path)
    except OSError as e:
        raise CheckpointDamaged(f"{path} cannot be read ({e})") from None
    if got != expected:
        raise CheckpointDamaged(f"{path} fails its checksum (CRC-32 {got:08x}, recorded {expected:08x}): "
                                "its bytes changed after it was written")


def load_tensors(path: str | Path) -> dict[str, torch.Tensor]:
    """Read a safetensors file, turning every failure into one CheckpointError naming the file."""
    path = Path(path)
    if not path.is_file():
        raise CheckpointError(f"checkpoint file {path} does not exist")
    try:
        return load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable safetensors file ({e})") from None


PICKLE_SUFFIXES = (".pth", ".pt", ".bin", ".ckpt")
WEIGHT_SUFFIXES = (".safetensors", *PICKLE_SUFFIXES)


def read_weights(path: str | Path) -> dict[str, torch.Tensor]:
    """The tensors of a released or trained checkpoint, whatever its format.

    Accepts one of our checkpoint directories (``final/``, ``step_*``: its ``model.safetensors``),
    a ``.safetensors`` file (ours, timm's), or a torch pickle (``.pth`` / ``.pt`` / ``.bin`` /
    ``.ckpt``: the official MAE's ``{"model": ...}``, MAWS's and timm's bare state dicts). A
    pickle is read with ``torch.load(weights_only=True)``: tensors, containers and plain values
    only (plus ``argparse.Namespace``, which official MAE training checkpoints carry as ``args``),
    so a payload can never run. Returns the file's top-level dict as is; see
    ``maws_fast.models.unwrap_state_dict`` for the state dict inside it.

    Raises:
        CheckpointError: missing, unreadable, of an unknown format, or holding other objects.
    """
    path = Path(path)
    if path.is_dir():
        inner = path / "model.safetensors"
        if not inner.is_file():
            raise CheckpointError(f"{path} is a directory without model.safetensors; point at a checkpoint "
                                  f"directory (final/ or step_*/) or a weights file ({', '.join(WEIGHT_SUFFIXES)})")
        return load_tensors(inner)
    if not path.is_file():
        raise CheckpointError(f"checkpoint {path} does not exist")
    if path.suffix == ".safetensors":
        return load_tensors(path)
    if path.suffix not in PICKLE_SUFFIXES:
        raise CheckpointError(f"{path}: unknown weights format {path.suffix!r}; use one of {', '.join(WEIGHT_SUFFIXES)} "
                              "or a checkpoint directory")
    import argparse
    import pickle

    try:
        with torch.serialization.safe_globals([argparse.Namespace]):
            obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as e:
        found = re.search(r"Unsupported global: GLOBAL (\S+)", str(e))
        if found is None:  # not a pickle of anything: truncated or another kind of file
            raise CheckpointError(f"{path} is not a readable torch checkpoint (truncated, or not a torch.save file)") from None
        raise CheckpointError(
            f"{path} holds Python objects other than tensors ({found.group(1)}), so it is refused: unpickling them "
            "could run code. If you trust the file, re-save only its state dict: "
            "torch.save(torch.load(f, weights_only=False)['model'], 'weights.pth')") from None
    except (RuntimeError, OSError, EOFError, ValueError) as e:
        raise CheckpointError(f"{path} is not a readable torch checkpoint ({e})") from None
    if not isinstance(obj, dict):
        raise CheckpointError(f"{path} holds a {type(obj).__name__}, not a state dict")
    return obj


# --- the single-process format ----------------------------------------------------------------------
def save_checkpoint(
    directory: str | Path,
    name: str,
    model_state: dict[str, torch.Tensor],
    meta: dict,
) -> Path:
    """Write single-process checkpoint ``directory/name`` atomically and return its path.

    Args:
        directory: parent directory (created if needed).
        name: checkpoint directory name (a stage's ``final``; resumable checkpoints are sharded).
        model_state: tensors to store in model.safetensors.
        meta: JSON-able metadata (step, config fingerprint, ...).
    """
    directory = Path(directory)
    directory.mkdir(parents=True, exist_ok=True)
    final = directory / name
    # What a save of this name killed mid-write left behind (one job per out_dir: none is in progress):
    # a temp dir goes; the previous checkpoint moved aside comes back if the new one never got in place.
    for stale in directory.glob(f".tmp-{name}-*"):
        shutil.rmtree(stale, ignore_errors=True)
    for old in sorted(directory.glob(f".old-{name}-*")):
        if final.exists():
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.rename(old, final)
    tmp = directory / f".tmp-{name}-{uuid.uuid4().hex[:8]}"
    try:
        tmp.mkdir()
        write_tensors(tmp / "model.safetensors", model_state)
        meta = {**meta, "format_version": FORMAT_VERSION}
        meta["files"] = {p.name: p.stat().st_size for p in tmp.iterdir()}
        write_json(tmp / "meta.json", meta)
        fsync_dir(tmp)
        replace_dir(tmp, final)
    except (OSError, SafetensorError) as e:  # safetensors reports a full disk as SafetensorError
        raise write_failed(final, e) from None
    finally:
        if tmp.exists():
            shutil.rmtree(tmp, ignore_errors=True)
    return final


def load_checkpoint(path: str | Path) -> tuple[dict[str, torch.Tensor], dict]:
    """Returns (model tensors, meta) of single-process checkpoint ``path``."""
    path = Path(path)
    meta = read_meta(path)
    return load_tensors(path / "model.safetensors"), meta


# --- one job per output directory --------------------------------------------------------------
LOCK_NAME = ".maws-train.lock"


def _pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's live process
        return True
    return True


def _job_id() -> str | None:
    """torchrun's rendezvous id: the same for every restart of one elastic job ("none" = not set)."""
    run_id = os.environ.get("TORCHELASTIC_RUN_ID")
    return None if run_id in (None, "", "none") else run_id


def acquire_run_lock(out_dir: str | Path, warn) -> Path:
    """Take ``out_dir``'s lock file (host, pid, start time, torchrun job id), created exclusively.

    A lock held by a live process (or by one on another host) is a UserError naming the holder. A
    stale one -- its pid dead on this host, or left by an earlier incarnation of this same torchrun
    job (an elastic restart) -- is taken over, with ``warn(message)``. Returns the lock's path.
    """
    import socket
    import time

    path = Path(out_dir) / LOCK_NAME
    me = {"host": socket.gethostname(), "pid": os.getpid(), "job": _job_id(),
          "started": time.strftime("%Y-%m-%dT%H:%M:%S%z")}
    for _ in range(5):
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            try:
                raw = path.read_text()
            except FileNotFoundError:
                continue  # released meanwhile: try again
            try:
                holder = json.loads(raw)
                pid = int(holder["pid"]) if isinstance(holder, dict) else None
            except (ValueError, KeyError, TypeError):
                holder, pid = {}, None
            same_job = me["job"] is not None and holder.get("job") == me["job"]
            stale = pid is None or same_job or (holder.get("host") == me["host"] and not _pid_alive(pid))
            if not stale:
                raise UserError(
                    f"{out_dir} is in use by another job: pid {pid} on {holder.get('host')} since "
                    f"{holder.get('started')} (lock file {path}). Wait for it to finish or use another --run.out_dir; "
                    f"if that job is gone, delete {path}")
            # Take it over by renaming it away (atomic: of two starters one wins), then check that what
            # was renamed is the lock judged stale, not a live one another starter made meanwhile.
            grave = path.with_name(f"{LOCK_NAME}.stale-{os.getpid()}")
            try:
                os.rename(path, grave)
            except FileNotFoundError:
                continue
            if grave.read_text() != raw:
                with contextlib.suppress(FileExistsError):
                    os.link(grave, path)  # put the live lock back (never over a newer one)
                grave.unlink()
                continue
            grave.unlink()
            what = ("unreadable" if pid is None else f"left by an earlier run of this job (pid {pid})" if same_job
                    else f"left by pid {pid}, which is no longer running")
            warn(f"WARNING: taking over the lock {path} ({what})")
            continue
        with os.fdopen(fd, "w") as f:
            json.dump(me, f)
        return path
    raise UserError(f"could not take the lock {path}: other jobs keep taking it; use another --run.out_dir")


def release_run_lock(path: Path) -> None:
    """Remove the lock if it is still this process's."""
    try:
        if json.loads(path.read_text()).get("pid") == os.getpid():
            path.unlink()
    except (OSError, ValueError, AttributeError):
        pass
