"""The PIL / torch DataLoader JPEG loader: the reference and fallback for the DALI pipeline.

Same sources (folder, file list, shards), same interface (``num_batches``, ``epoch(epoch,
start_batch)``, ``state_dict()``), same sharding by global rank with padded last batches, and
the same augmentation (boxes and flips from :mod:`maws_fast.data.batching`), decoded by PIL in
``num_workers`` worker processes. The sample order of an epoch is a permutation drawn from
(seed, epoch), so the reader state is just (epoch, batch): the "sample offset plus seed" of an
exact resume.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from maws_fast.data.batching import (
    BadSamples, EvalTransform, FinetuneAugment, TrainAugment, augment_batch, batches_per_epoch, real_in_batch,
    shard_indices,
)
from maws_fast.data.images import ImageInfo, decode_pil, inspect_image
from maws_fast.data.shards import ShardReader
from maws_fast.data.sources import Source, pad_tags
from maws_fast.errors import DataError
from maws_fast.seeds import Stream, mix_seed

TARGETS = ("none", "tags", "label", "caption")


def read_sample(source: Source, i: int, reader: ShardReader | None) -> tuple[bytes, list[int], int, str | None, str]:
    """``(encoded bytes, tag ids, label or -1, caption or None, problem)`` of sample ``i`` of any source.

    ``problem`` is "" or why the file could not be read (it then counts as a bad sample).
    """
    if source.shards is not None:
        data, meta = reader.read(source.shards.samples[i])
        return data, list(meta.get("tags", [])), int(meta.get("label", -1)), meta.get("caption"), ""
    label = source.labels[i] if source.labels is not None else -1
    tags = list(source.tags[i]) if source.tags is not None else []
    caption = source.captions[i] if source.captions is not None else None
    try:
        with open(source.paths[i], "rb") as f:
            return f.read(), tags, label, caption, ""
    except OSError as e:
        return b"", tags, label, caption, f"cannot read the file: {e.strerror}"


def _resize_pil(pixels: np.ndarray, box: Sequence[int] | None, size: tuple[int, int], flip: bool) -> np.ndarray:
    """Crop ``box`` (top, left, h, w), resize to ``size`` (h, w) bilinear with antialias, flip."""
    from PIL import Image

    im = Image.fromarray(pixels)
    if box is not None:
        top, left, h, w = (int(v) for v in box)
        im = im.crop((left, top, left + w, top + h))
    im = im.resize((size[1], size[0]), Image.BILINEAR)  # PIL's bilinear is antialiased when shrinking
    out = np.asarray(im)
    return out[:, ::-1] if flip else out


def eval_geometry(height: int, width: int, t: EvalTransform) -> tuple[tuple[int, int], tuple[int, int]]:
    """(resized (h, w), crop (top, left)) of the eval transform for one image size."""
    s = t.resize_shorter
    rh, rw = (s, max(1, round(width * s / height))) if height <= width else (max(1, round(height * s / width)), s)
    # Centre crop rounded half up, as DALI's crop_mirror_normalize places it.
    return (rh, rw), ((rh - t.out_size + 1) // 2, (rw - t.out_size + 1) // 2)


class _Batches(Dataset):
    def __init__(self, loader: PilLoader, rows: torch.Tensor, epoch: int, start: int):
        self.ld, self.rows, self.epoch, self.start = loader, rows, epoch, start
        self.reader: ShardReader | None = None

    def __len__(self) -> int:
        return self.ld.num_batches - self.start

    def __getitem__(self, k: int):
        try:
            return self._batch(k)
        except DataError as e:  # returned, not raised: a worker's exception would carry its traceback
            return e

    def _batch(self, k: int):
        ld = self.ld
        b = self.start + k
        if self.reader is None and ld.source.shards is not None:
            self.reader = ShardReader()  # one per worker process
        idx = self.rows[b * ld.batch_size : (b + 1) * ld.batch_size].tolist()
        samples = [read_sample(ld.source, i, self.reader) for i in idx]
        names = [ld.source.names[i] for i in idx]
        pixels: list[np.ndarray | None] = []
        problems: list[str] = []
        for data, _, _, _, unreadable in samples:
            info = inspect_image(data)
            px, why = None, unreadable or info.problem
            if info.ok:
                try:
                    px = decode_pil(data, ld.mode)
                except ValueError as e:
                    why = str(e)
            pixels.append(px)
            problems.append(why)
        bad = [p is None for p in pixels]
        slots = ld.bad.substitute(bad) if any(bad) else list(range(len(idx)))
        pixels = [pixels[j] for j in slots]
        infos = [ImageInfo("", p.shape[0], p.shape[1]) for p in pixels]
        if isinstance(ld.transform, TrainAugment):
            boxes, flips = augment_batch(infos, ld.seed, self.epoch, b, ld.rank, ld.transform)
            size = (ld.transform.out_size, ld.transform.out_size)
            out = [_resize_pil(p, boxes[i].tolist(), size, bool(flips[i])) for i, p in enumerate(pixels)]
            if ld.extras is not None:
                out = ld.extras.images(out, ld.seed, self.epoch, b, ld.rank)
        else:
            out = []
            for p in pixels:
                (rh, rw), (top, left) = eval_geometry(p.shape[0], p.shape[1], ld.transform)
                r = _resize_pil(p, None, (rh, rw), False)
                out.append(r[top : top + ld.transform.out_size, left : left + ld.transform.out_size])
        x = torch.from_numpy(np.stack(out))  # (B, S, S[, C]) uint8
        x = x.unsqueeze(-1) if x.dim() == 3 else x
        tags = [samples[j][1] for j in slots]
        labels = torch.tensor([samples[j][2] for j in slots], dtype=torch.int64)
        captions = [samples[j][3] for j in slots]
        where = [names[j] for j in slots]
        return (x.permute(0, 3, 1, 2).contiguous(), tags, labels, (captions, where),
                [(names[i], problems[i]) for i in range(len(idx)) if bad[i]])


class PilLoader:
    """Batches of augmented images decoded by PIL: the DALI loader's reference (same interface).

    Args:
        source: what to read (:func:`maws_fast.data.sources.open_source`).
        batch_size: per-rank batch size.
        seed: base seed of the sample order and the augmentation.
        mean: per-channel mean of [0, 1] pixels.
        std: per-channel std of [0, 1] pixels.
        transform: a :class:`TrainAugment` (training) or :class:`EvalTransform`.
        targets: "none" (MAE), "tags" (WSP: padded ids + uniform weights) or "label".
        rank: global rank (the shard this process reads).
        world: global world size.
        shuffle: a new sample order every epoch; False reads in source order.
        channels: 3 (RGB) or 1 (grey).
        num_workers: DataLoader worker processes decoding batches ahead.
        max_bad: distinct bad files tolerated (see :class:`BadSamples`).
        max_tags: pad width of the tag ids (0 = longest in the batch).
        log: where bad-sample lines go.
    """

    def __init__(self, source: Source, batch_size: int, seed: int, mean: Sequence[float], std: Sequence[float],
                 transform: TrainAugment | EvalTransform, targets: str = "none", rank: int = 0, world: int = 1,
                 shuffle: bool = True, channels: int = 3, num_workers: int = 0, max_bad: int = 0, max_tags: int = 0,
                 log: Callable[[str], None] = print):
        check_loader_args(source, batch_size, rank, world, targets, channels, mean, std)
        self.source, self.batch_size, self.seed = source, int(batch_size), int(seed)
        self.transform, self.targets, self.rank, self.world = transform, targets, rank, world
        self.shuffle, self.mode, self.num_workers, self.max_tags = shuffle, "RGB" if channels == 3 else "L", num_workers, max_tags
        self.mean = torch.tensor(mean, dtype=torch.float32).view(1, -1, 1, 1)
        self.std = torch.tensor(std, dtype=torch.float32).view(1, -1, 1, 1)
        self.bad = BadSamples(max_bad, log, verify_hint(source))
        self.position = (0, 0)
        # a fine-tune's RandAugment (in the workers, per image) and RandomErasing (here, normalised)
        self.extras = FinetuneAugment.for_transform(transform, mean)

    @property
    def num_batches(self) -> int:
        return batches_per_epoch(len(self.source), self.world, self.batch_size)

    def __len__(self) -> int:
        return self.num_batches

    def order(self, epoch: int) -> torch.Tensor:
        n = len(self.source)
        if not self.shuffle:
            return torch.arange(n)
        return torch.randperm(n, generator=torch.Generator().manual_seed(mix_seed(Stream.PERMUTATION, self.seed, epoch)))

    def state_dict(self) -> dict[str, Any]:
        e, b = self.position
        return {"kind": "pil", "epoch": e, "batch": b, "bad": self.bad.state_dict(), **loader_identity(self)}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        check_identity(state, self)
        self.bad.load_state_dict(state.get("bad", {}))
        self.position = (int(state["epoch"]), int(state["batch"]))

    def close(self) -> None:
        """Nothing to release: each epoch's DataLoader workers end with the epoch."""

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, Any]]:
        """Yields ``(images, targets)`` of one epoch from ``start_batch`` on.

        Images are float32 ``(B, C, S, S)`` normalised; targets per ``self.targets``: None,
        ``(ids (B, T) int64, weights (B, T) float32)``, or int64 labels ``(B,)``. With shuffle off
        (evaluation) the padding of the last batch is cut off.
        """
        if not 0 <= start_batch <= self.num_batches:
            raise DataError(f"start_batch {start_batch} is outside 0..{self.num_batches}; resume with the same data, "
                            "batch size and world size")
        rows = shard_indices(self.order(epoch), self.rank, self.world, self.batch_size)
        dl = DataLoader(_Batches(self, rows, epoch, start_batch), batch_size=None, num_workers=self.num_workers)
        for k, item in enumerate(dl, start=start_batch):
            if isinstance(item, DataError):
                raise DataError(str(item)) from None
            x, tags, labels, (captions, where), bad = item
            for name, why in bad:  # workers cannot share the counter: the main process keeps it
                self.bad.add(name, why)
            keep = x.shape[0] if self.shuffle else real_in_batch(len(self.source), self.rank, self.world,
                                                                 self.batch_size, k)
            imgs = (x[:keep].float().div_(255) - self.mean) / self.std
            if self.extras is not None:
                imgs = self.extras.tensors(imgs, self.seed, epoch, k, self.rank)
            self.position = (epoch, k + 1) if k + 1 < self.num_batches else (epoch + 1, 0)
            yield imgs, make_targets(self.targets, tags[:keep], labels[:keep], self.max_tags, captions[:keep],
                                     where[:keep])


def make_targets(kind: str, tags: list[list[int]], labels: torch.Tensor, max_tags: int,
                 captions: list[str | None] | None = None, names: list[str] | None = None):
    """A batch's targets of ``kind``: padded tags, labels, the captions (a list of strings), or None."""
    if kind == "tags":
        return pad_tags(tags, max_tags)
    if kind == "caption":
        missing = [n for n, c in zip(names or [], captions or []) if c is None]
        if missing or captions is None:
            raise DataError(f"{missing[0] if missing else 'a sample'} has no caption; every LiT training sample needs "
                            "one (a \"caption\" in its shard .json, or a line in the file list's caption JSONL)")
        return list(captions)
    return labels if kind == "label" else None


def verify_hint(source: Source) -> str:
    flag = {"webdataset": "--shards", "folder": "--folder", "filelist": "--list"}[source.kind]
    where = source.shards.root if source.shards is not None else "PATH"
    return f"maws-data verify {flag} {where} --write-clean CLEAN"


def check_loader_args(source: Source, batch_size: int, rank: int, world: int, targets: str, channels: int,
                      mean: Sequence[float], std: Sequence[float]) -> None:
    if batch_size < 1:
        raise DataError(f"batch_size must be >= 1, got {batch_size}")
    if world < 1 or not 0 <= rank < world:
        raise DataError(f"rank {rank} is not in 0..{world - 1}")
    if len(source) < world:
        raise DataError(f"{len(source)} samples cannot be sharded over {world} ranks; every rank needs at least one")
    if targets not in TARGETS:
        raise DataError(f"targets must be one of {TARGETS}, got {targets!r}")
    if targets == "label" and source.labels is None and source.kind != "webdataset":
        raise DataError(f"a {source.kind} source has no class labels; use an image folder or shards written from one")
    if targets == "caption":
        check_captions(source)
    if channels not in (1, 3) or len(mean) != channels or len(std) != channels:
        raise DataError(f"channels must be 1 or 3 with one mean/std each; got {channels}, mean {mean}, std {std}")


def check_captions(source: Source) -> None:
    """Before any batch: every sample of ``source`` has a caption (shards say how many in their manifest)."""
    if source.shards is not None:
        n = source.shards.manifest.get("captions", 0)
        if n != len(source):
            raise DataError(f"the shards in {source.shards.root} hold {n} captions for {len(source)} samples; write them "
                            "with captions (`maws-data shards --list L --captions C.jsonl`, or --fmnist "
                            "--weak-hashtags N, which writes them from the tags)")
        return
    if source.captions is None:
        raise DataError(f"a {source.kind} source has no captions; LiT reads a file list with a caption JSONL "
                        "(--data.captions) or shards written with captions")
    missing = [source.names[i] for i, c in enumerate(source.captions) if c is None]
    if missing:
        raise DataError(f"{len(missing)} of {len(source)} images have no caption in the caption JSONL (first: "
                        f"{missing[0]}); caption every image or drop it from the list")


def loader_identity(ld) -> dict[str, Any]:
    """What a saved data state is only valid for."""
    return {"num_samples": len(ld.source), "batch_size": ld.batch_size, "world": ld.world, "rank": ld.rank,
            "seed": ld.seed, "shuffle": ld.shuffle}


def check_identity(state: dict[str, Any], ld) -> None:
    mine = loader_identity(ld)
    diff = [f"{k}: saved {state.get(k)!r}, now {v!r}" for k, v in mine.items() if state.get(k) != v]
    if diff:
        raise DataError(f"the checkpoint's data state does not fit this loader ({'; '.join(diff)}); resume with the "
                        "same data, batch size, seed and world size, or start a new run directory")
