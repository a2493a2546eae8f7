"""Data sources: an ImageNet-style folder, a file list + hashtag JSONL, or webdataset shards.

Every source becomes a :class:`Source`: a table of samples the loaders index by position, with
a name per sample for error messages, and (for files) the path, tag ids and class label. Shard
samples keep their tags inside the shard, in each sample's ``.json``.

Hashtags
--------
A :class:`Vocab` file (``vocab.json``) maps tag strings to ids (their position) and keeps each
tag's count. The WSP target of an image is its tags, spread uniformly (each of its T tags gets
weight 1/T): :func:`pad_tags` gives the sparse form the soft-target cross-entropy takes.
:func:`resample_indices` implements the inverse-square-root-frequency resampling of Mahajan et
al. (2018): images are drawn with probability proportional to the mean over their tags of
``count(tag) ** -0.5``, which flattens the long tail of tag frequencies. It is applied when
shards are written (``maws-data shards --resample inv_sqrt``), because container readers can
only shuffle, not weight.
"""

from __future__ import annotations

import json
import os
from collections import Counter
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from maws_fast.data.images import IMAGE_EXTS
from maws_fast.data.jsonl import check_caption, jsonl_rows
from maws_fast.data.shards import ShardSet, open_shards
from maws_fast.errors import DataError
from maws_fast.storage import atomic_write_text

SOURCE_KINDS = ("folder", "filelist", "webdataset")


# --- vocabulary ----------------------------------------------------------------------------------
@dataclass
class Vocab:
    """Hashtag vocabulary: tag strings, their ids (list position) and counts."""

    tags: list[str]
    counts: list[int]
    _ids: dict[str, int] = field(default_factory=dict, repr=False)

    def __post_init__(self) -> None:
        if len(self.tags) != len(self.counts):
            raise DataError(f"vocabulary has {len(self.tags)} tags but {len(self.counts)} counts")
        self._ids = {t: i for i, t in enumerate(self.tags)}
        if len(self._ids) != len(self.tags):
            dup = [t for t, n in Counter(self.tags).items() if n > 1][:5]
            raise DataError(f"vocabulary repeats tags {dup}; every tag must appear once")

    def __len__(self) -> int:
        return len(self.tags)

    def id(self, tag: str) -> int | None:
        return self._ids.get(tag)

    @classmethod
    def load(cls, path: str | Path) -> Vocab:
        """Reads ``{"tags": [{"tag": str, "count": int}, ...]}``.

        Raises:
            DataError: naming the file when it is missing or malformed.
        """
        p = Path(path)
        try:
            rows = json.loads(p.read_text())["tags"]
            return cls([str(r["tag"]) for r in rows], [int(r.get("count", 0)) for r in rows])
        except FileNotFoundError:
            raise DataError(f"hashtag vocabulary {p} does not exist; build one with `maws-data vocab --tags TAGS.jsonl "
                            f"--out {p}` or pass the right path") from None
        except (ValueError, KeyError, TypeError) as e:
            raise DataError(f"{p} is not a hashtag vocabulary ({type(e).__name__}: {e}); expected "
                            '{"tags": [{"tag": "...", "count": N}, ...]}') from None

    def save(self, path: str | Path) -> None:
        atomic_write_text(path, json.dumps({"tags": [{"tag": t, "count": c} for t, c in zip(self.tags, self.counts)]},
                                           indent=0))


def build_vocab(tag_lists: Iterable[Sequence[str]], min_count: int = 1, max_size: int | None = None) -> Vocab:
    """Vocabulary of the tags seen on at least ``min_count`` images, most frequent first (ties by
    name), cut to the ``max_size`` most frequent when given."""
    counts = Counter(t for tags in tag_lists for t in set(tags))
    kept = sorted(((t, c) for t, c in counts.items() if c >= min_count), key=lambda tc: (-tc[1], tc[0]))
    if not kept:
        raise DataError(f"no tag occurs at least {min_count} times; lower the minimum count")
    kept = kept[:max_size] if max_size is not None else kept
    return Vocab([t for t, _ in kept], [c for _, c in kept])


@dataclass(frozen=True)
class VocabCoverage:
    """What a vocabulary keeps of a tagged set: distinct tags, images with at least one kept tag, and
    tag occurrences (one per image and distinct tag)."""

    tags_kept: int
    tags_seen: int
    rows_kept: int
    rows: int
    occurrences_kept: int
    occurrences: int

    def summary(self) -> str:
        pct = lambda a, b: f"{100 * a / b:.2f}%" if b else "-"  # noqa: E731
        return (f"{self.tags_kept} of {self.tags_seen} distinct tags kept; {self.rows_kept} of {self.rows} images "
                f"({pct(self.rows_kept, self.rows)}) keep at least one tag, {self.rows - self.rows_kept} keep none; "
                f"{self.occurrences_kept} of {self.occurrences} tag occurrences ({pct(self.occurrences_kept, self.occurrences)})")


def vocab_coverage(tag_lists: Sequence[Sequence[str]], vocab: Vocab) -> VocabCoverage:
    """How much of ``tag_lists`` (string tags per image) ``vocab`` keeps."""
    seen: set[str] = set()
    rows_kept = occ = occ_kept = 0
    for tags in tag_lists:
        distinct = set(tags)
        seen |= distinct
        kept = sum(vocab.id(t) is not None for t in distinct)
        occ, occ_kept, rows_kept = occ + len(distinct), occ_kept + kept, rows_kept + (kept > 0)
    return VocabCoverage(len(vocab), len(seen), rows_kept, len(tag_lists), occ_kept, occ)


# --- sources -------------------------------------------------------------------------------------
@dataclass
class Source:
    """A table of samples.

    Attributes:
        kind: "folder", "filelist" or "webdataset".
        names: a human-readable name per sample (its path, or ``shard.tar:key``).
        paths: file paths (file sources), else None.
        tags: tag ids per sample (file sources), else None (shards keep them per sample).
        labels: class label per sample (folder source), else None.
        classes: class names of a folder source (or of shards written from one).
        vocab: the hashtag vocabulary, when the source has one.
        shards: the shard set (webdataset source), else None.
        captions: one caption (or None) per sample of a file list with a caption JSONL, else None
            (shards keep theirs in each sample's ``.json``, as ``caption``).
    """

    kind: str
    names: list[str]
    paths: list[str] | None = None
    tags: list[list[int]] | None = None
    labels: list[int] | None = None
    classes: list[str] | None = None
    vocab: Vocab | None = None
    shards: ShardSet | None = None
    captions: list[str | None] | None = None

    def __len__(self) -> int:
        return len(self.names)

    @property
    def num_classes(self) -> int:
        """Size of the target space: the vocabulary, else the class list, else 0."""
        if self.vocab is not None:
            return len(self.vocab)
        return len(self.classes) if self.classes else 0


def scan_folder(root: str | Path) -> Source:
    """ImageNet layout: ``root/<class>/<image>.{jpg,jpeg,png}``; classes in sorted order.

    Raises:
        DataError: for a missing folder, one without class sub-folders, or without images.
    """
    root = Path(root)
    if not root.is_dir():
        raise DataError(f"image folder {root} does not exist; give an existing folder with one sub-folder per class")
    classes = sorted(d.name for d in root.iterdir() if d.is_dir() and not d.name.startswith("."))
    if not classes:
        raise DataError(f"{root} has no class sub-folders; an image folder is DIR/<class>/<image>.jpg")
    paths, labels = [], []
    for label, cls in enumerate(classes):
        for dirpath, dirs, files in os.walk(root / cls):
            dirs.sort()  # the walk's order must not depend on the filesystem (exact resume elsewhere)
            for f in sorted(files):
                if f.lower().endswith(IMAGE_EXTS):
                    paths.append(os.path.join(dirpath, f))
                    labels.append(label)
    if not paths:
        raise DataError(f"{root} holds no {'/'.join(IMAGE_EXTS)} images under its {len(classes)} class folders")
    return Source("folder", list(paths), paths, [[y] for y in labels], labels, classes)


def read_file_list(list_path: str | Path, tags_path: str | Path | None, vocab: Vocab | None,
                   captions_path: str | Path | None = None) -> Source:
    """A text file of image paths (one per line, relative to the list's folder) + hashtag JSONL.

    The JSONL has one ``{"file": path, "tags": [...]}`` per image (tags as strings, mapped through
    ``vocab``, or as ids). Tags missing from the vocabulary are dropped (the vocabulary may have
    a minimum count); an image listed without a JSONL line has no tags.

    Raises:
        DataError: for a missing list, an empty list, bad JSONL lines, or string tags without a
            vocabulary.
    """
    lp = Path(list_path)
    try:
        lines = [ln.strip() for ln in lp.read_text().splitlines()]
    except FileNotFoundError:
        raise DataError(f"file list {lp} does not exist; give an existing text file with one image path per line") from None
    rel = [ln for ln in lines if ln and not ln.startswith("#")]
    if not rel:
        raise DataError(f"file list {lp} lists no images")
    paths = [p if os.path.isabs(p) else str(lp.parent / p) for p in rel]
    tags: list[list[int]] = [[] for _ in paths]
    if tags_path is not None:
        where = {p: i for i, p in enumerate(rel)}
        for no, row in jsonl_rows(tags_path, ("file", "tags"), "hashtag file",
                                  'give the JSONL of {"file": ..., "tags": [...]} lines, or none'):
            file, raw = row["file"], row["tags"]
            i = where.get(file)
            if i is None:
                continue
            if all(isinstance(t, int) for t in raw):
                tags[i] = sorted(set(raw))
            elif vocab is None:
                raise DataError(f"{tags_path} holds string hashtags but no vocabulary was given; pass one (--vocab, or "
                                f"--data.vocab when training) (build it with `maws-data vocab --tags {tags_path} --out "
                                "vocab.json`)")
            else:
                tags[i] = sorted({j for t in raw if (j := vocab.id(str(t))) is not None})
    captions = read_caption_jsonl(captions_path, rel) if captions_path is not None else None
    return Source("filelist", list(paths), paths, tags, None, None, vocab, captions=captions)


def read_caption_jsonl(path: str | Path, files: Sequence[str]) -> list[str | None]:
    """The caption of each of ``files`` from a JSONL of ``{"file": path, "caption": "..."}`` lines
    (paths as the file list writes them); a file without a line has None. Lines for other files are
    ignored; a file captioned twice keeps its last line."""
    where = {f: i for i, f in enumerate(files)}
    out: list[str | None] = [None] * len(files)
    for no, row in jsonl_rows(path, ("file", "caption"), "caption file",
                              'give the JSONL of {"file": ..., "caption": "..."} lines of the file list'):
        caption = check_caption(path, no, row["caption"])
        i = where.get(row["file"])
        if i is not None:
            out[i] = caption
    return out


def open_source(kind: str, path: str | Path, tags: str | Path | None = None,
                vocab: str | Path | Vocab | None = None, captions: str | Path | None = None) -> Source:
    """Opens any source kind (see :data:`SOURCE_KINDS`); a vocab path is loaded; ``captions`` is a
    file list's caption JSONL (see :func:`read_caption_jsonl`)."""
    if isinstance(vocab, (str, Path)):
        vocab = Vocab.load(vocab)
    if kind == "folder":
        src = scan_folder(path)
        src.vocab = vocab
        return src
    if captions is not None and kind != "filelist":
        raise DataError(f"a caption JSONL ({captions}) goes with a file list; a {kind} source cannot take one (shards "
                        "carry their captions: `maws-data shards --list L --captions C.jsonl`)")
    if kind == "filelist":
        return read_file_list(path, tags, vocab, captions)
    if kind == "webdataset":
        shards = open_shards(path)
        m = shards.manifest
        if vocab is None and m.get("vocab"):
            vocab = Vocab.load(shards.root / m["vocab"])
        return Source("webdataset", [s.name for s in shards.samples], classes=m.get("classes"), vocab=vocab,
                      shards=shards)
    raise DataError(f"unknown data source kind {kind!r}; choose from {SOURCE_KINDS}")


# --- WSP targets ---------------------------------------------------------------------------------
def pad_tags(tag_lists: Sequence[Sequence[int]], max_tags: int = 0) -> tuple[torch.Tensor, torch.Tensor]:
    """Uniform soft targets in sparse form: padded tag ids and their weights.

    Args:
        tag_lists: per sample, its tag ids.
        max_tags: pad width T (0 = the longest list; at least 1). Longer lists keep their first T.

    Returns:
        ``(ids, weights)``: int64 ``(B, T)`` padded with -1 and float32 ``(B, T)`` with 1/n on each
        of a sample's n tags (0 on padding, and an all-zero row for a tagless sample).
    """
    t = max_tags or max(1, max((len(x) for x in tag_lists), default=1))
    ids = np.full((len(tag_lists), t), -1, dtype=np.int64)
    wts = np.zeros((len(tag_lists), t), dtype=np.float32)
    for i, tags in enumerate(tag_lists):
        tags = list(tags)[:t]
        if tags:
            ids[i, : len(tags)] = tags
            wts[i, : len(tags)] = 1.0 / len(tags)
    return torch.from_numpy(ids), torch.from_numpy(wts)


def resample_indices(tag_lists: Sequence[Sequence[int]], counts: Sequence[int], num: int, seed: int) -> np.ndarray:
    """Draws ``num`` sample indices (with replacement) by inverse-sqrt tag frequency.

    A sample's weight is the mean over its tags of ``count ** -0.5`` (tagless samples weigh 0).

    Returns:
        int64 ``(num,)`` indices, sorted (the shard writer shuffles afterwards).
    """
    c = np.asarray(counts, dtype=np.float64)
    w = np.array([np.mean(c[list(t)] ** -0.5) if len(t) else 0.0 for t in tag_lists])
    if not (w > 0).any():
        raise DataError("inverse-sqrt resampling needs tagged samples with counts > 0; none has tags")
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(len(w), size=num, replace=True, p=w / w.sum()))
