"""Webdataset tar shards with DALI index files: the format, the writer and a random-access reader.

A shard directory holds

* ``shard-000000.tar`` ...: POSIX tars; sample ``k`` is two members, ``<key>.jpg`` (the encoded
  image) and ``<key>.json`` (``{"tags": [ids], "label": id-or-absent, "src": "original name"}``);
* ``shard-000000.idx`` ...: one DALI webdataset index per tar (``fn.readers.webdataset`` needs it
  to seek): a ``v1.2 <n>`` line, then per sample ``jpg <offset> <size> <key>.jpg json <offset>
  <size> <key>.json`` with byte offsets of the member data inside the tar;
* ``manifest.json``: shard list with sample counts, the vocabulary / class names, and how many
  inputs were rejected when the shards were written.

Container readers only shuffle within a buffer, so the writer shuffles the whole sample list
before it cuts shards.
"""

from __future__ import annotations

import io
import json
import re
import os
import tarfile
import threading
from collections.abc import Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path

from maws_fast.data.images import IMAGE_EXTS
from maws_fast.errors import DataError
from maws_fast.storage import atomic_write_text

MANIFEST = "manifest.json"
# What a shard write (``maws-data shards``) leaves in its directory, finished or interrupted: the one
# kind of non-empty directory a new write may go to (it overwrites them).
_SHARD_OUTPUT = re.compile(r"(shard-\d{6}\.(tar|idx)|manifest\.json|rejected\.tsv|vocab\.json)(\.tmp)?"
                           r"|\.(manifest\.json|rejected\.tsv|vocab\.json)\.[0-9a-f]{8}\.tmp")  # storage.atomic_file's
INDEX_VERSION = "v1.2"
FORMAT = "maws-webdataset"


@dataclass(frozen=True)
class ShardSample:
    """Where one sample's two members lie inside its tar."""

    tar: str
    key: str
    jpg_offset: int
    jpg_size: int
    json_offset: int
    json_size: int

    @property
    def name(self) -> str:
        """``shard.tar:key`` -- the name errors and reports use for the sample."""
        return f"{self.tar}:{self.key}"


def _add_member(tar: tarfile.TarFile, name: str, payload: bytes) -> int:
    """Appends one regular-file member; returns the byte offset of its data in the tar."""
    info = tarfile.TarInfo(name)
    info.size = len(payload)
    info.mode = 0o644
    # The data starts after the member's header blocks (one 512-byte block for USTAR names).
    data_offset = tar.offset + len(info.tobuf(tar.format, tar.encoding, tar.errors))
    tar.addfile(info, io.BytesIO(payload))
    return data_offset


class ShardWriter:
    """Writes samples into numbered shards of ``samples_per_shard`` each, with their indexes.

    Every file is written under a temporary name and renamed when complete, so an interrupted
    writer never leaves a tar without its index or a manifest listing a torn shard.

    Args:
        out_dir: the shard directory (created; must not already hold a manifest).
        samples_per_shard: samples per tar (the last one may hold fewer).
    """

    def __init__(self, out_dir: str | Path, samples_per_shard: int):
        if samples_per_shard < 1:
            raise DataError(f"samples per shard must be >= 1, got {samples_per_shard}")
        self.out = Path(out_dir)
        if (self.out / MANIFEST).exists():
            raise DataError(f"{self.out} already holds shards ({MANIFEST}); write to a new directory or delete it")
        foreign = sorted(p.name for p in self.out.iterdir() if not _SHARD_OUTPUT.fullmatch(p.name)) \
            if self.out.is_dir() else []
        if foreign:
            raise DataError(f"{self.out} is not empty and not an earlier shard output (it holds {', '.join(foreign[:3])}"
                            f"{' ...' if len(foreign) > 3 else ''}); write the shards to a new or empty directory")
        self.out.mkdir(parents=True, exist_ok=True)
        self.per_shard = samples_per_shard
        self.shards: list[dict] = []
        self._tar: tarfile.TarFile | None = None
        self._lines: list[str] = []
        self.count = 0

    def _open(self) -> None:
        name = f"shard-{len(self.shards):06d}"
        self._name = name
        self._tar = tarfile.open(self.out / f"{name}.tar.tmp", "w", format=tarfile.USTAR_FORMAT)
        self._lines = []

    def _close(self) -> None:
        if self._tar is None:
            return
        self._tar.close()
        tmp_idx = self.out / f"{self._name}.idx.tmp"
        tmp_idx.write_text(f"{INDEX_VERSION} {len(self._lines)}\n" + "".join(line + "\n" for line in self._lines))
        for ext in ("tar", "idx"):
            os.replace(self.out / f"{self._name}.{ext}.tmp", self.out / f"{self._name}.{ext}")
        self.shards.append({"tar": f"{self._name}.tar", "index": f"{self._name}.idx", "samples": len(self._lines)})
        self._tar = None

    def write(self, key: str, jpeg: bytes, meta: dict) -> None:
        """Adds one sample: its encoded JPEG and its JSON metadata (``tags``, ``label``, ``src``)."""
        if self._tar is None:
            self._open()
        payload = json.dumps(meta, separators=(",", ":")).encode()
        off_j = _add_member(self._tar, f"{key}.jpg", jpeg)
        off_m = _add_member(self._tar, f"{key}.json", payload)
        self._lines.append(f"jpg {off_j} {len(jpeg)} {key}.jpg json {off_m} {len(payload)} {key}.json")
        self.count += 1
        if len(self._lines) == self.per_shard:
            self._close()

    def finish(self, **manifest: object) -> Path:
        """Closes the last shard and writes the manifest (extra keys are stored in it)."""
        self._close()
        body = {"format": FORMAT, "num_samples": self.count, "shards": self.shards, **manifest}
        atomic_write_text(self.out / MANIFEST, json.dumps(body, indent=1))
        return self.out / MANIFEST


def read_index(idx_path: str | Path, tar_path: str | Path) -> list[ShardSample]:
    """Parses one DALI webdataset index (as written here or by DALI's ``wds2idx``).

    Raises:
        DataError: naming the file, when it is missing or not a jpg + json index.
    """
    idx_path = Path(idx_path)
    try:
        lines = idx_path.read_text().splitlines()
    except FileNotFoundError:
        raise DataError(f"{tar_path} has no DALI index {idx_path}; write shards with `maws-data shards`, "
                        f"or index this tar with DALI's `wds2idx {tar_path} {idx_path}`") from None
    head = lines[0].split() if lines else []
    if len(head) != 2 or head[0] != INDEX_VERSION or not head[1].isdigit() or int(head[1]) != len(lines) - 1:
        raise DataError(f"{idx_path} is not a {INDEX_VERSION} DALI index of {len(lines) - 1} samples "
                        f"(header {lines[:1]}); re-create it with `wds2idx {tar_path} {idx_path}`")
    out = []
    for no, line in enumerate(lines[1:], start=2):
        parts = line.split()
        fields = {parts[i]: parts[i + 1 : i + 4] for i in range(0, len(parts) - 3, 4)}
        if len(parts) % 4 or "jpg" not in fields or "json" not in fields:
            raise DataError(f"{idx_path}:{no}: a sample needs a .jpg and a .json member, got {line!r}; "
                            "every sample of a maws shard is <key>.jpg + <key>.json")
        (jo, js, jn), (mo, ms, _) = fields["jpg"], fields["json"]
        out.append(ShardSample(str(tar_path), jn.rsplit(".", 1)[0], int(jo), int(js), int(mo), int(ms)))
    return out


@dataclass
class ShardSet:
    """The shards of one directory, in order, with every sample's location."""

    root: Path
    tars: list[str]
    indexes: list[str]
    samples: list[ShardSample]
    manifest: dict

    def __len__(self) -> int:
        return len(self.samples)


def _image_folder(root: Path) -> bool:
    """Whether ``root`` looks like DIR/<class>/<image>: a sub-directory holding an image (a few looked at)."""
    for sub in sorted(p for p in root.iterdir() if p.is_dir())[:8]:
        if any(f.suffix.lower() in IMAGE_EXTS for f in list(sub.iterdir())[:64]):
            return True
    return False


def open_shards(root: str | Path) -> ShardSet:
    """Lists a shard directory: from its manifest, or every ``*.tar`` with a matching ``*.idx``.

    Raises:
        DataError: for a missing directory, one without shards, or a shard without its index.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"shard directory {root} does not exist; pass the directory `maws-data shards --out DIR` "
                        "wrote, or write one there")
    manifest_path = root / MANIFEST
    if manifest_path.exists():
        try:
            manifest = json.loads(manifest_path.read_text())
            tars = [str(root / s["tar"]) for s in manifest["shards"]]
            indexes = [str(root / s["index"]) for s in manifest["shards"]]
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{manifest_path} is not a maws shard manifest ({e}); re-write the shards") from None
    else:
        manifest = {}
        tars = sorted(str(p) for p in root.glob("*.tar"))
        indexes = [t[: -len(".tar")] + ".idx" for t in tars]
    if not tars:
        if _image_folder(root):
            raise DataError(f"{root} holds no .tar shards but looks like an image folder (class sub-folders of "
                            f"images): read it as one with --data.format=folder, or write shards from it into another "
                            f"directory with `maws-data shards --folder {root} --out DIR`")
        raise DataError(f"{root} holds no .tar shards; pass the directory `maws-data shards --out DIR` wrote")
    per_shard = [read_index(i, t) for t, i in zip(tars, indexes)]
    # A shard without samples (e.g. all of it rejected by `maws-data verify`) is left out: DALI's
    # reader cannot open an empty tar.
    kept = [k for k, ss in enumerate(per_shard) if ss]
    tars, indexes = [tars[k] for k in kept], [indexes[k] for k in kept]
    samples = [s for k in kept for s in per_shard[k]]
    if not samples:
        raise DataError(f"the shards in {root} hold no samples")
    return ShardSet(root, tars, indexes, samples, manifest)


class ShardReader:
    """Random access to shard samples by offset (one open file per tar, kept; usable from threads)."""

    def __init__(self) -> None:
        self._files: dict[str, int] = {}
        self._lock = threading.Lock()

    def _fd(self, tar: str) -> int:
        with self._lock:  # one open per tar, whichever thread comes first; pread needs no lock
            fd = self._files.get(tar)
            if fd is None:
                try:
                    fd = self._files[tar] = os.open(tar, os.O_RDONLY)
                except OSError as e:
                    raise DataError(f"cannot open shard {tar}: {e.strerror}") from None
        return fd

    def read_raw(self, s: ShardSample) -> tuple[bytes, bytes]:
        """``(jpeg bytes, json bytes)`` of one sample, the JSON unparsed (a checker can still look at the image)."""
        fd = self._fd(s.tar)
        jpg = os.pread(fd, s.jpg_size, s.jpg_offset)
        meta_raw = os.pread(fd, s.json_size, s.json_offset)
        if len(jpg) != s.jpg_size or len(meta_raw) != s.json_size:
            raise DataError(f"{s.name}: the tar is shorter than its index says (truncated copy?); "
                            "re-copy the shard or re-write the shards")
        return jpg, meta_raw

    def read_meta(self, s: ShardSample) -> dict:
        """The metadata dict of one sample, without reading its image."""
        raw = os.pread(self._fd(s.tar), s.json_size, s.json_offset)
        if len(raw) != s.json_size:
            raise DataError(f"{s.name}: the tar is shorter than its index says (truncated copy?); "
                            "re-copy the shard or re-write the shards")
        return parse_meta(raw, s.name)

    def read(self, s: ShardSample) -> tuple[bytes, dict]:
        """Returns ``(jpeg bytes, metadata dict)`` of one sample."""
        jpg, meta_raw = self.read_raw(s)
        return jpg, parse_meta(meta_raw, s.name)

    def close(self) -> None:
        for fd in self._files.values():
            os.close(fd)
        self._files.clear()

    def __del__(self) -> None:  # pragma: no cover - best effort
        try:
            self.close()
        except Exception:
            pass


def parse_meta(raw: bytes, name: str) -> dict:
    """Parses a sample's JSON member; ``tags`` must be a list of ints."""
    try:
        meta = json.loads(raw)
        tags = meta.get("tags", [])
        if not isinstance(tags, list) or not all(isinstance(t, int) for t in tags):
            raise ValueError(f"tags must be a list of ints, got {tags!r}")
    except (ValueError, AttributeError) as e:
        raise DataError(f"{name}: its .json is not valid sample metadata ({e}); "
                        "check the shard with `maws-data verify`") from None
    return meta


def iter_tar(tar_path: str | Path) -> Iterator[tuple[str, str, bytes]]:
    """Yields ``(key, extension, payload)`` of every regular member of a tar, in order."""
    with tarfile.open(tar_path, "r") as tar:
        for m in tar:
            if not m.isfile():
                continue
            key, _, ext = m.name.rpartition(".")
            f = tar.extractfile(m)
            yield key, ext, f.read() if f is not None else b""


def chunks(seq: list, n: int) -> Iterable[list]:
    for i in range(0, len(seq), n):
        yield seq[i : i + n]
