"""What ``maws-data shards`` and ``maws-data verify`` (:mod:`maws_fast.cli.data`) do beneath their commands.

The threaded map every command reads images with, the decode checks that say why an image cannot
be used, the inputs of ``shards`` (a folder, a file list + hashtag JSONL, or Fashion-MNIST) and
their payloads, and ``verify``'s pass over shards with the clean indexes it can write. The shard
format itself is :mod:`maws_fast.data.shards`; errors a user can cause are
:class:`~maws_fast.errors.UserError` (``DataError``).
"""

from __future__ import annotations

import argparse
import json
import os
import sys
from collections import Counter, deque
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from itertools import islice
from pathlib import Path

import numpy as np

from maws_fast.data.images import ImageInfo, decode_pil, encode_jpeg, inspect_image
from maws_fast.data.jsonl import jsonl_rows
from maws_fast.data.shards import FORMAT, INDEX_VERSION, MANIFEST, ShardReader, ShardSample, open_shards, parse_meta
from maws_fast.data.sources import Vocab, build_vocab, read_file_list, scan_folder
from maws_fast.errors import DataError
from maws_fast.storage import atomic_write_text

VOCAB_FILE = "vocab.json"


# --- helpers -------------------------------------------------------------------------------------
def pmap(fn: Callable, items: Sequence, workers: int, desc: str) -> Iterator:
    """``fn`` over ``items`` in input order, on ``workers`` threads, with a tqdm bar on stderr.

    Threads, not processes: PIL releases the GIL while it decodes and encodes, and nothing has to
    be pickled. At most ``4 * workers`` results are in flight, so a slow consumer (the tar writer)
    never makes the images of the whole dataset pile up in memory.
    """
    from tqdm import tqdm

    bar = tqdm(total=len(items), desc=desc, unit="img", file=sys.stderr, disable=None, leave=False)
    try:
        if workers <= 1 or len(items) <= 1:
            for r in map(fn, items):
                bar.update()
                yield r
            return
        with ThreadPoolExecutor(workers) as pool:
            it = iter(items)
            pending = deque(pool.submit(fn, x) for x in islice(it, 4 * workers))
            try:
                while pending:
                    r = pending.popleft().result()  # waits for the oldest: output order = input order
                    for x in islice(it, 1):
                        pending.append(pool.submit(fn, x))
                    bar.update()
                    yield r
            finally:
                for f in pending:
                    f.cancel()
    finally:
        bar.close()


def _decode_problem(buf: bytes, info: ImageInfo) -> str:
    """"" when PIL decodes ``buf`` in full, else why not (the header check's words when it has some)."""
    try:
        decode_pil(buf, "RGB")
    except ValueError as e:
        # The header check's words say what is wrong more plainly than PIL's, when it has some.
        return f"does not decode: {info.problem or e}"
    return ""


def _image_problem(buf: bytes) -> str:
    """Why the loaders cannot use these bytes ("" when they can): a full decode + the header check."""
    info = inspect_image(buf)
    if p := _decode_problem(buf, info):
        return p
    if not info.ok:
        # PIL copes, but the loaders check every sample's structure first and would reject it.
        return f"decodes, but the loaders reject it: {info.problem}"
    return ""


def check_file(path: str) -> str:
    """Why the image file at ``path`` cannot be used ("" when it can), or why it cannot be read."""
    try:
        return _image_problem(Path(path).read_bytes())
    except OSError as e:
        return f"cannot read ({e.strerror})"


def read_tag_rows(path: str | Path) -> list[list]:
    """The ``tags`` list of every row of a hashtag JSONL (``{"file": ..., "tags": [...]}``)."""
    rows = []
    for no, row in jsonl_rows(path, ("file", "tags"), "hashtag file", 'pass a JSONL with one {"file": ..., "tags": '
                              "[...]} per image"):
        if not isinstance(row["tags"], list):
            raise DataError(f'{path}:{no}: "tags" is {type(row["tags"]).__name__}, not a list')
        rows.append(row["tags"])
    return rows


def vocab_for_list(tags: str | None, vocab: str | None) -> Vocab | None:
    """The vocabulary of a file list: ``vocab`` loaded, else built from the string tags of ``tags``."""
    if vocab is not None:
        return Vocab.load(vocab)
    if tags is None:
        return None
    rows = read_tag_rows(tags)
    if all(isinstance(t, int) for row in rows for t in row):
        return None  # tag ids: no vocabulary needed
    return build_vocab([[str(t) for t in row] for row in rows])


def short_name(s: ShardSample) -> str:
    """``shard-000001.tar:000000042``: the tar's file name, not its whole path."""
    return f"{Path(s.tar).name}:{s.key}"


# --- shards --------------------------------------------------------------------------------------
@dataclass
class _Inputs:
    """What ``shards`` writes: per input a name, tags and label, and either a file or pixels.

    Attributes:
        names: shown in rejected.tsv and errors (the path, or ``dataset:index``).
        srcs: stored as the sample's ``src`` (path relative to the folder / list).
        tags: tag ids per input.
        labels: class label per input, or None.
        files: input file paths, or None for in-memory pixels.
        pixels: uint8 ``(N, H, W)`` grey images (Fashion-MNIST), or None.
        manifest: extra manifest keys (``classes``, ``vocab``, ``source``).
        vocab: saved as DIR/vocab.json when set.
        captions: a caption (or None) per input, stored as the sample's ``caption``; or None.
    """

    names: list[str]
    srcs: list[str]
    tags: list[list[int]]
    labels: list[int] | None
    files: list[str] | None = None
    pixels: np.ndarray | None = None
    manifest: dict = field(default_factory=dict)
    vocab: Vocab | None = None
    captions: list[str | None] | None = None

    def check(self, i: int) -> str:
        """Why input ``i`` cannot be stored ("" when it can): a full decode of the file."""
        if self.files is None:
            return ""
        try:
            buf = Path(self.files[i]).read_bytes()
        except OSError as e:
            return f"cannot read ({e.strerror})"
        return _decode_problem(buf, inspect_image(buf))

    def payload(self, i: int, quality: int) -> bytes:
        """The JPEG stored for input ``i`` (which :meth:`check` passed)."""
        if self.files is None:
            return encode_jpeg(self.pixels[i], quality)
        try:
            buf = Path(self.files[i]).read_bytes()
        except OSError as e:
            raise DataError(f"{self.names[i]} became unreadable while the shards were written ({e.strerror}); "
                            "run the command again") from None
        info = inspect_image(buf)
        if info.ok and info.format == "jpeg" and info.channels in (1, 3):
            return buf  # byte-for-byte: no second lossy encode
        # PNG, CMYK JPEG, or a JPEG only PIL copes with: re-encode so every decoder takes it.
        try:
            pixels = decode_pil(buf, "L" if info.channels in (1, 2) else "RGB")  # grey stays grey
        except ValueError as e:
            raise DataError(f"{self.names[i]} changed while the shards were written ({e}); "
                            "run the command again") from None
        return encode_jpeg(pixels, quality)


def shard_inputs(a: argparse.Namespace) -> _Inputs:
    if a.folder is not None:
        src = scan_folder(a.folder)
        rel = [os.path.relpath(p, a.folder) for p in src.paths]
        return _Inputs(src.paths, rel, src.tags, src.labels, files=src.paths,
                       manifest={"classes": src.classes, "source": f"folder {a.folder}"})
    if a.list is not None:
        vocab = vocab_for_list(a.tags, a.vocab)
        src = read_file_list(a.list, a.tags, vocab, a.captions)
        rel = [os.path.relpath(p, Path(a.list).parent) for p in src.paths]
        manifest = {"source": f"list {a.list}", **({"vocab": VOCAB_FILE} if vocab else {})}
        return _Inputs(src.paths, rel, src.tags, None, files=src.paths, manifest=manifest, vocab=vocab,
                       captions=src.captions)
    from maws_fast.data import fmnist

    x, y = fmnist.load_fmnist(a.data, a.split)
    if a.weak_hashtags is not None:
        mosaics, multi_hot = fmnist.make_weak_hashtags(x, y, a.weak_hashtags, seed=a.seed)
        tags = [np.flatnonzero(row).tolist() for row in multi_hot.numpy() > 0]
        names = [f"fmnist-weak-hashtags:{i}" for i in range(len(tags))]
        vocab = Vocab(list(fmnist.VOCAB), multi_hot.sum(0).long().tolist())
        # the LiT demo's captions, written from the same noisy tags (fmnist.make_captions)
        captions = fmnist.make_captions(multi_hot, a.seed)
        return _Inputs(names, names, tags, None, pixels=mosaics.numpy(), vocab=vocab, captions=captions,
                       manifest={"vocab": VOCAB_FILE, "source": f"fmnist {a.split} weak hashtags, seed {a.seed}"})
    labels = y.tolist()
    names = [f"fmnist-{a.split}:{i}" for i in range(len(labels))]
    return _Inputs(names, names, [[c] for c in labels], labels, pixels=x.numpy(),
                   manifest={"classes": list(fmnist.CLASSES), "source": f"fmnist {a.split}"})


def tag_counts(inputs: _Inputs) -> list[int]:
    """Per-tag counts for resampling: the vocabulary's, else counted over the inputs."""
    if inputs.vocab is not None:
        return inputs.vocab.counts
    c = Counter(t for tags in inputs.tags for t in set(tags))
    return [c.get(t, 0) for t in range(max(c, default=-1) + 1)]


# --- verify --------------------------------------------------------------------------------------
def verify_shards(root: str, workers: int) -> tuple:
    """Decode every sample of the shards in ``root`` and parse its metadata, on ``workers`` threads.

    Returns:
        ``(shards, names, reasons)``: the opened shards, each sample's short name, and why each
        sample cannot be used ("" for a good one), in sample order.
    """
    shards = open_shards(root)
    reader = ShardReader()

    def check(s: ShardSample) -> str:
        try:
            jpg, raw = reader.read_raw(s)
        except DataError as e:
            return str(e).removeprefix(f"{s.name}: ")  # the report names the sample itself
        problems = [p] if (p := _image_problem(jpg)) else []
        try:
            parse_meta(raw, short_name(s))
        except DataError as e:
            problems.append(str(e).removeprefix(f"{short_name(s)}: "))
        return "; ".join(problems)

    try:
        reasons = list(pmap(check, shards.samples, workers, "verify"))
    finally:
        reader.close()
    return shards, [short_name(s) for s in shards.samples], reasons


def write_clean_shards(shards, reasons: list[str], dest: Path) -> Path:
    """Indexes of the good samples only, in ``dest``, with a manifest pointing at the original tars."""
    if (dest / MANIFEST).exists():
        raise DataError(f"{dest} already holds shards ({MANIFEST}); pass a new directory to --write-clean")
    dest.mkdir(parents=True, exist_ok=True)
    keep: dict[str, list[ShardSample]] = {t: [] for t in shards.tars}
    for s, r in zip(shards.samples, reasons):
        if not r:
            keep[s.tar].append(s)
    entries, used = [], set()
    for no, (tar, idx) in enumerate(zip(shards.tars, shards.indexes)):
        if not keep[tar]:
            continue  # an empty index would be a shard with nothing to read
        name = Path(idx).name if Path(idx).name not in used else f"{no:06d}-{Path(idx).name}"
        used.add(name)
        lines = [f"jpg {s.jpg_offset} {s.jpg_size} {s.key}.jpg json {s.json_offset} {s.json_size} {s.key}.json"
                 for s in keep[tar]]
        atomic_write_text(dest / name, f"{INDEX_VERSION} {len(lines)}\n" + "".join(ln + "\n" for ln in lines))
        entries.append({"tar": str(Path(tar).resolve()), "index": name, "samples": len(lines)})
    manifest = {k: v for k, v in shards.manifest.items() if k not in ("shards", "num_samples")}
    if manifest.get("vocab"):  # open_source looks for it next to the manifest
        manifest["vocab"] = str((shards.root / manifest["vocab"]).resolve())
    kept = sum(e["samples"] for e in entries)
    if manifest.get("captions"):  # every sample captioned stays every sample; a partial count is not kept
        manifest["captions"] = kept if manifest["captions"] == len(shards.samples) else 0
    manifest.update(format=FORMAT, num_samples=kept, shards=entries,
                    cleaned_from=str(shards.root.resolve()), removed=sum(1 for r in reasons if r))
    atomic_write_text(dest / MANIFEST, json.dumps(manifest, indent=1))
    return dest / MANIFEST

