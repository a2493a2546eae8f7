"""Sharded checkpoints: every rank writes its own shard, any layout can load them back.

Layout of one checkpoint directory (``world`` ranks)::

    step_00000200/
        rank_00000.safetensors  # rank 0's pieces: "<timm key>/param", "/exp_avg", "/exp_avg_sq"
        rank_00000.json         # rank 0's pieces, its rank_meta (data-loader state) and a commit token
        ...                     # one pair per rank
        extra.safetensors       # frozen params / buffers (pos_embed, ...), whole, written by rank 0
        meta.json               # the caller's meta + the layout of every rank + file sizes (rank 0)

A *piece* is the element range ``[start, end)`` of the flattened TP-local tensor of one parameter
(see :class:`Piece`), so the format describes ZeRO-1/2/3 flat shards, DDP's even split and
tensor-parallel cuts alike. Loading into the same layout reads one file (fast path); loading into
another world size, ZeRO stage, TP or DP degree rebuilds only the tensors it needs (reshard).

Commit protocol (all ranks call :func:`save_sharded` with the same ``directory`` and ``name``):

    phase 0  rank 0 deletes a stale ``directory/.tmp-<name>`` left by a crashed run and creates it
             afresh                                                                     -> barrier
    phase 1  every rank writes rank_XXXXX.safetensors, fsync, then rank_XXXXX.json, fsync (the
             json is the rank's "done" mark)                                            -> barrier
    phase 2  rank 0 reads every rank json; if all are there it writes meta.json, fsyncs and renames
             the temp dir into place (old-aside-then-delete when replacing), prunes ``keep``;
             otherwise it deletes the temp dir                                          -> barrier
    phase 3  rank r != 0 checks that ``<name>/rank_r.json`` holds the random token it wrote: the
             commit happened (and it is this save, not an older checkpoint of the same name).

The temp dir name is computed by every rank without communication. The extra barrier of phase 0
is what makes cleaning a stale temp dir safe: nobody writes into it before rank 0 has emptied it.
Every rank goes through all three barriers even when its own write failed (the error is raised
after phase 3), so one failing rank never leaves the others hanging, and a failed save never
renames anything: the previous checkpoints stay untouched. The directory must be on a file system
that every rank sees (the usual shared out_dir of a multi-node run).
"""
from __future__ import annotations

import contextlib
import json
import math
import shutil
import uuid
from collections.abc import Callable
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from maws_fast.errors import CheckpointDamaged, CheckpointError, UserError
from maws_fast.parallel.tensor import Piece, TPSplit, tp_full, tp_local
from maws_fast.storage import (
    FORMAT_VERSION,
    atomic_file,
    check_crc32,
    file_crc32,
    fsync_dir,
    list_checkpoints,
    load_tensors,
    read_meta,
    replace_dir,
    write_failed,
    write_json,
    write_tensors,
)

NAMES = ("param", "exp_avg", "exp_avg_sq")  # tensors of one piece; exports hold "param" only
_RESERVED = ("format_version", "files", "sharded", "rank_meta")  # meta.json keys this module owns


# --- layout <-> JSON ------------------------------------------------------------------------------


def _piece_to_json(p: Piece) -> dict:
    tp = None if p.tp is None else {"dim": p.tp.dim, "groups": p.tp.groups}
    return {"key": p.key, "shape": list(p.shape), "tp": tp, "tp_rank": p.tp_rank, "tp_size": p.tp_size,
            "start": p.start, "end": p.end}


def _piece_from_json(d: dict) -> Piece:
    tp = None if d["tp"] is None else TPSplit(d["tp"]["dim"], d["tp"]["groups"])
    return Piece(d["key"], tuple(d["shape"]), tp, d["tp_rank"], d["tp_size"], d["start"], d["end"])


def _local_form(p: Piece) -> tuple | None:
    """Pieces with equal forms index the same flattened local tensor (None: the full tensor)."""
    if p.tp is None or p.tp_size == 1:
        return None
    return (p.tp.dim % len(p.shape), p.tp.groups, p.tp_size)


def _local_numel(p: Piece) -> int:
    return math.prod(p.shape) // (1 if _local_form(p) is None else p.tp_size)


def _cover(cands: list[tuple[Piece, int]], lo: int, hi: int) -> list[tuple[int, int, Piece, int]] | None:
    """Pick (a, b, piece, rank) covering [lo, hi) from candidate pieces, or None if there is a gap.

    Greedy interval cover: at each position take the candidate reaching farthest. Replicated
    tensors are held by several tp ranks; each element is still read once.
    """
    cands = sorted((c for c in cands if c[0].end > lo and c[0].start < hi), key=lambda c: c[0].start)
    out, pos, i = [], lo, 0
    while pos < hi:
        best = None
        while i < len(cands) and cands[i][0].start <= pos:
            if best is None or cands[i][0].end > best[0].end:
                best = cands[i]
            i += 1
        if best is None or best[0].end <= pos:
            return None
        end = min(best[0].end, hi)
        out.append((pos, end, *best))
        pos = end
    return out


# --- save ----------------------------------------------------------------------------------------


def _write_rank(tmp: Path, rank: int, world: int, pieces: list[Piece], tensors: dict, extra: dict,
                rank_meta: dict, token: str) -> None:
    if len({p.key for p in pieces}) != len(pieces):
        raise ValueError(f"rank {rank} has two pieces of the same key; each rank holds one piece per parameter")
    flat, names = {}, None
    for p in pieces:
        if p.start == p.end:
            continue  # nothing stored; the layout still records the key and its shape
        held = tensors[p.key]
        if names is None:
            names = sorted(held)
        if sorted(held) != names or "param" not in held or not set(held) <= set(NAMES):
            raise ValueError(f"rank {rank}: tensors of {p.key!r} are {sorted(held)}; every piece needs the same "
                             f"subset of {NAMES} including 'param'")
        for n, t in held.items():
            if t.dim() != 1 or t.numel() != p.end - p.start:
                raise ValueError(f"rank {rank}: {p.key}/{n} has shape {tuple(t.shape)}, its piece wants ({p.end - p.start},)")
            flat[f"{p.key}/{n}"] = t
    f = tmp / f"rank_{rank:05d}.safetensors"
    write_tensors(f, flat)
    info = {"rank": rank, "world": world, "token": token, "file": f.name, "bytes": f.stat().st_size,
            "crc32": file_crc32(f),  # read back from the page cache: a later bit flip is caught on load
            "names": names, "pieces": [_piece_to_json(p) for p in pieces], "meta": rank_meta}
    if rank == 0:
        write_tensors(tmp / "extra.safetensors", extra)
        info["extra_crc32"] = file_crc32(tmp / "extra.safetensors")
    # written last: its presence tells rank 0 that this rank's tensors are complete on disk
    write_json(tmp / f"rank_{rank:05d}.json", info)


def _commit(directory: Path, tmp: Path, final: Path, world: int, meta: dict, keep: int | None) -> None:
    """Rank 0, after every rank wrote: check, write meta.json, rename into place, prune."""
    clash = [k for k in _RESERVED if k in meta]
    if clash:
        raise ValueError(f"meta keys {clash} are reserved by the sharded checkpoint format")
    infos, missing = [], []
    for r in range(world):
        j = tmp / f"rank_{r:05d}.json"
        try:
            raw = j.read_bytes()
            infos.append({**json.loads(raw), "json": j.name, "json_bytes": len(raw)})
        except (OSError, ValueError):
            missing.append(r)
    if missing:
        raise CheckpointError(f"ranks {missing} did not finish writing their shard of {final} (see their errors); "
                              f"earlier checkpoints are untouched")
    keys: dict[str, dict] = {}
    by_key: dict[str, list[tuple[Piece, int]]] = {}
    for info in infos:
        for d in info["pieces"]:
            p = _piece_from_json(d)
            k = keys.setdefault(p.key, {"shape": d["shape"], "tp": d["tp"]})
            if k["shape"] != d["shape"]:
                raise ValueError(f"ranks disagree on the shape of {p.key!r}: {k['shape']} vs {d['shape']}")
            by_key.setdefault(p.key, []).append((p, info["rank"]))
    # Check at save time that every element of every tensor is stored somewhere: an engine bug
    # found now costs one failed save, found at load time it costs the run.
    for key, ps in by_key.items():
        forms = {_local_form(p) for p, _ in ps}
        if len(forms) != 1:
            raise ValueError(f"ranks disagree on how {key!r} is split over tp ranks: {sorted(map(str, forms))}")
        for t in range(1 if forms == {None} else ps[0][0].tp_size):
            own = [c for c in ps if forms == {None} or c[0].tp_rank == t]
            if _cover(own, 0, _local_numel(ps[0][0])) is None:
                raise ValueError(f"the pieces of {key!r} (tp rank {t}) leave elements that no rank stores")
    names = [set(i["names"]) for i in infos if i["names"] is not None]
    layout = {
        "world": world,
        "keys": keys,
        "optim": bool(names) and all(set(NAMES) <= n for n in names),
        "ranks": [{"file": i["file"], "bytes": i["bytes"], "crc32": i["crc32"], "json": i["json"],
                   "json_bytes": i["json_bytes"],
                   # empty pieces carry no data: only the key index above keeps them
                   "pieces": [d for d in i["pieces"] if d["start"] < d["end"]]} for i in infos],
    }
    out = {**meta, "format_version": FORMAT_VERSION, "sharded": layout, "rank_meta": [i["meta"] for i in infos],
           "files": {"extra.safetensors": (tmp / "extra.safetensors").stat().st_size},
           "crc32": {"extra.safetensors": infos[0]["extra_crc32"]}}
    write_json(tmp / "meta.json", out)
    fsync_dir(tmp)
    replace_dir(tmp, final)
    if keep is not None:  # the newest ``keep``, and never the checkpoint just written
        for stale in list_checkpoints(directory)[:-keep]:
            if stale != final:
                shutil.rmtree(stale, ignore_errors=True)


def save_sharded(
    directory: str | Path,
    name: str,
    *,
    rank: int,
    world: int,
    pieces: list[Piece],
    tensors: dict[str, dict[str, torch.Tensor]],
    extra: dict[str, torch.Tensor],
    meta: dict,
    rank_meta: dict,
    barrier: Callable[[], object],
    keep: int | None = None,
) -> Path:
    """Write sharded checkpoint ``directory/name`` atomically across ranks; every rank calls this.

    Args:
        directory: parent directory, on a file system every rank sees (created if needed).
        name: checkpoint directory name, e.g. ``step_00000200`` or ``final``.
        rank: this process's global rank; world: number of ranks.
        pieces: this rank's pieces, one per trainable parameter (possibly empty: start == end).
        tensors: ``{key: {"param": 1-D, "exp_avg": 1-D, "exp_avg_sq": 1-D}}`` with numel
            ``end - start`` for each non-empty piece; the moments may be left out (an export).
        extra: frozen params / buffers as full tensors, stored by rank 0 (ignored on other ranks).
        meta: JSON-able metadata written by rank 0 (step, config fingerprint, param groups, ...).
        rank_meta: JSON-able per-rank metadata (e.g. this rank's data-loader state).
        barrier: blocks until every rank called it (``torch.distributed.barrier`` on the right
            group, or a no-op for one process); called exactly three times by every rank.
        keep: after writing, rank 0 deletes all but the newest ``keep`` ``step_*`` checkpoints.

    Returns:
        The checkpoint path. Raises UserError on every rank when any rank failed to write; then
        nothing was renamed and earlier checkpoints are untouched.
    """
    directory = Path(directory)
    final, tmp = directory / name, directory / f".tmp-{name}"
    err: Exception | None = None
    if rank == 0:  # phase 0: a fresh temp dir (a crashed earlier save may have left one)
        try:
            directory.mkdir(parents=True, exist_ok=True)
            if tmp.exists():
                shutil.rmtree(tmp)
            tmp.mkdir()
        except Exception as e:  # noqa: BLE001 - raised after the barriers so no rank hangs
            err = e
    barrier()
    token = uuid.uuid4().hex
    try:  # phase 1: every rank writes its shard
        if err is None and not tmp.is_dir():
            raise CheckpointError(f"rank 0 could not create {tmp} (see rank 0's error); earlier checkpoints are untouched")
        if err is None:
            _write_rank(tmp, rank, world, pieces, tensors, extra if rank == 0 else {}, rank_meta, token)
    except Exception as e:  # noqa: BLE001 - kept and raised after the barriers so no rank hangs
        err = err or e
    barrier()
    if rank == 0:  # phase 2: commit, or throw the temp dir away
        try:
            if err is None:
                _commit(directory, tmp, final, world, meta, keep)
        except Exception as e:  # noqa: BLE001 - same: raise after the last barrier
            err = e
        finally:
            if tmp.exists():
                shutil.rmtree(tmp, ignore_errors=True)
    barrier()
    if err is None and rank != 0:  # phase 3: did rank 0 commit THIS save?
        try:
            committed = json.loads((final / f"rank_{rank:05d}.json").read_text())["token"] == token
        except (OSError, ValueError, KeyError):
            committed = False
        if not committed:
            err = CheckpointError(f"checkpoint {final} was not written (rank 0 or another rank failed, see their "
                                  f"errors); earlier checkpoints are untouched")
    if isinstance(err, (OSError, SafetensorError)):  # safetensors reports a full disk as SafetensorError
        raise write_failed(final, err) from None
    if err is not None:
        raise err
    return final


# --- load ----------------------------------------------------------------------------------------


class _Shards:
    """Opens rank files lazily (checking their size against meta.json) and reads slices."""

    def __init__(self, path: Path, layout: dict, stack: contextlib.ExitStack):
        self.path, self.layout, self.stack, self.open = path, layout, stack, {}

    def read(self, rank: int, name: str, a: int, b: int) -> torch.Tensor:
        info = self.layout["ranks"][rank]
        f = self.path / info["file"]
        try:
            if rank not in self.open:
                if not f.is_file() or f.stat().st_size != info["bytes"]:
                    raise CheckpointDamaged(f"{f} is missing or truncated (expected {info['bytes']} bytes)")
                if info.get("crc32") is not None:  # checkpoints of earlier versions carry none
                    check_crc32(f, info["crc32"])
                self.open[rank] = self.stack.enter_context(safe_open(str(f), framework="pt"))
            return self.open[rank].get_slice(name)[a:b]
        except (SafetensorError, OSError, ValueError) as e:
            raise CheckpointDamaged(f"{f} is not a readable shard ({e})") from None


def _gather(shards: _Shards, cands: list[tuple[Piece, int]], name: str, key: str, lo: int, hi: int) -> torch.Tensor:
    parts = _cover(cands, lo, hi)
    if parts is None:
        raise CheckpointDamaged(f"{shards.path} is incomplete: some elements of {key!r} are in no rank file")
    chunks = [shards.read(r, f"{key}/{name}", a - p.start, b - p.start) for a, b, p, r in parts]
    return chunks[0] if len(chunks) == 1 else torch.cat(chunks)


def _full(shards: _Shards, pieces: list[tuple[Piece, int]], key: str, name: str) -> torch.Tensor:
    """The full tensor of ``key``: undo the saved TP split of the saved pieces."""
    p0 = pieces[0][0]
    if _local_form(p0) is None:
        return _gather(shards, pieces, name, key, 0, math.prod(p0.shape)).view(p0.shape)
    dim = p0.tp.dim % len(p0.shape)
    local_shape = (*p0.shape[:dim], p0.shape[dim] // p0.tp_size, *p0.shape[dim + 1:])
    n = math.prod(local_shape)
    locals_ = [_gather(shards, [c for c in pieces if c[0].tp_rank == t], name, key, 0, n).view(local_shape)
               for t in range(p0.tp_size)]
    return tp_full(locals_, p0.tp)


def _read_meta(path: Path) -> dict:
    meta = read_meta(path)  # meta.json missing / corrupt, extra.safetensors truncated
    if "sharded" not in meta:
        raise CheckpointError(f"{path} is a single-process checkpoint, not a sharded one; load it with "
                              f"maws_fast.storage.load_checkpoint")
    return meta


def _by_key(layout: dict) -> dict[str, list[tuple[Piece, int]]]:
    out: dict[str, list[tuple[Piece, int]]] = {}
    for r, info in enumerate(layout["ranks"]):
        for d in info["pieces"]:
            out.setdefault(d["key"], []).append((_piece_from_json(d), r))
    return out


def _check_wanted(path: Path, layout: dict, wanted: list[Piece]) -> None:
    if len({p.key for p in wanted}) != len(wanted):
        raise ValueError("wanted has two pieces of the same key; a rank holds one piece per parameter")
    problems = []
    for p in wanted:
        saved = layout["keys"].get(p.key)
        if saved is None:
            problems.append(f"{p.key!r} is not in it")
        elif tuple(saved["shape"]) != p.shape:
            problems.append(f"{p.key!r} has shape {tuple(saved['shape'])} there but {p.shape} in this model")
    if problems:
        more = f" (and {len(problems) - 3} more)" if len(problems) > 3 else ""
        raise CheckpointError(f"checkpoint {path} does not fit this model: {'; '.join(problems[:3])}{more}; "
                              f"use the model config the checkpoint was trained with")


def load_sharded(
    path: str | Path, wanted: list[Piece], *, with_optim: bool = True
) -> tuple[dict[str, dict[str, torch.Tensor]], dict[str, torch.Tensor], dict, list[dict]]:
    """Read this rank's pieces from a sharded checkpoint saved in any layout.

    Args:
        path: checkpoint directory written by :func:`save_sharded`.
        wanted: this rank's pieces in the NEW layout (any world size, ZeRO stage, TP / DP degree).
        with_optim: also return "exp_avg" / "exp_avg_sq" (CheckpointError if the checkpoint has none).

    Returns:
        ``(tensors, extra, meta, rank_metas)``: ``{key: {"param": 1-D, ...}}`` for each wanted
        piece, the full extra tensors, meta.json, and the saved ranks' rank_meta in saved-rank order.
    """
    path = Path(path)
    meta = _read_meta(path)
    layout = meta["sharded"]
    if with_optim and not layout["optim"]:
        raise CheckpointError(f"checkpoint {path} holds no optimizer state (it is a weights export); load it "
                              f"as weights only or resume from a training checkpoint")
    names = NAMES if with_optim else ("param",)
    _check_wanted(path, layout, wanted)
    by_key = _by_key(layout)
    # Fast path: a saved rank held exactly these pieces -> read only its file.
    mine = {p for p in wanted if p.start < p.end}
    match = next((r for r, info in enumerate(layout["ranks"])
                  if {_piece_from_json(d) for d in info["pieces"]} == mine), None)
    out = {}
    with contextlib.ExitStack() as stack:
        shards = _Shards(path, layout, stack)
        for p in wanted:
            out[p.key] = {}
            src = [c for c in by_key.get(p.key, []) if match is None or c[1] == match]
            if p.start < p.end and not src:
                raise CheckpointDamaged(f"{path} is incomplete: no rank file holds {p.key!r}")
            for n in names:  # one tensor at a time bounds memory by the largest full tensor
                if p.start == p.end:
                    out[p.key][n] = torch.empty(0, dtype=torch.float32)
                elif _local_form(p) == _local_form(src[0][0]):
                    # same TP cut as saved: read just the element ranges that overlap [start, end)
                    same = [c for c in src if _local_form(p) is None or c[0].tp_rank == p.tp_rank]
                    out[p.key][n] = _gather(shards, same, n, p.key, p.start, p.end)
                else:  # TP degree / split changed: rebuild the full tensor, then cut the new piece
                    full = _full(shards, src, p.key, n)
                    out[p.key][n] = tp_local(full, p.tp, p.tp_rank, p.tp_size).view(-1)[p.start:p.end].clone()
    extra = load_tensors(path / "extra.safetensors")
    return out, extra, meta, list(meta["rank_meta"])


# --- consolidate / list --------------------------------------------------------------------------


def consolidate(path: str | Path) -> dict[str, torch.Tensor]:
    """Full tensors of a sharded checkpoint with timm keys: every trainable param plus the extras."""
    path = Path(path)
    meta = _read_meta(path)
    by_key = _by_key(meta["sharded"])
    out = {}
    with contextlib.ExitStack() as stack:
        shards = _Shards(path, meta["sharded"], stack)
        for key, info in sorted(meta["sharded"]["keys"].items()):
            if key not in by_key:  # every piece empty: a zero-element tensor
                out[key] = torch.empty(info["shape"], dtype=torch.float32)
            else:
                out[key] = _full(shards, by_key[key], key, "param")
    out.update(load_tensors(path / "extra.safetensors"))
    return out


def export_safetensors(path: str | Path, out_file: str | Path) -> Path:
    """Write the consolidated weights of sharded checkpoint ``path`` to one safetensors file, atomically."""
    out_file, path = Path(out_file), Path(path)
    if (path / "model.safetensors").is_file() and not (path / "rank_00000.json").exists():
        raise CheckpointError(f"{path} is already consolidated (a single-process checkpoint, such as a stage's "
                              f"final/): its weights are {path / 'model.safetensors'}, timm keys; copy that file")
    tensors = consolidate(path)
    try:
        out_file.parent.mkdir(parents=True, exist_ok=True)
        with atomic_file(out_file) as tmp:
            write_tensors(tmp, tensors)
    except (OSError, SafetensorError) as e:
        raise UserError(f"could not write {out_file}: {getattr(e, 'strerror', None) or e}; free disk space or "
                        f"choose another output file") from None
    return out_file


def is_sharded(path: str | Path) -> bool:
    """Whether ``path`` looks like a sharded checkpoint (cheap: file names only, no parsing)."""
    path = Path(path)
    return (path / "meta.json").is_file() and (path / "rank_00000.json").is_file()


def list_sharded(directory: str | Path) -> list[Path]:
    """Complete sharded ``step_*`` checkpoints under ``directory``, oldest first (temp dirs are ignored)."""
    return [p for p in list_checkpoints(directory) if is_sharded(p)]

