"""The interface every training loader offers, and the factory of the JPEG loaders a config asks for.

Three loaders implement :class:`Loader`: the in-memory reference (``data.reference.BatchLoader``,
Fashion-MNIST), the PIL DataLoader (``data.pil_loader.PilLoader``) and DALI
(``data.dali.DaliLoader``). The training loop uses nothing else of them.
"""
from __future__ import annotations

import functools
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol, runtime_checkable

import torch

from maws_fast.config import Config
from maws_fast.errors import ConfigError

if TYPE_CHECKING:  # annotations only: the loaders are imported when one is built
    from maws_fast.data.batching import BadSamples
    from maws_fast.data.sources import Source


@runtime_checkable
class Loader(Protocol):
    """What the training loop needs of a loader (each rank's loader yields its share of a global batch).

    Attributes:
        num_batches: batches per epoch (the same on every rank).
        bad: the record of corrupt images replaced so far, or None where nothing is decoded.
    """

    bad: BadSamples | None

    @property
    def num_batches(self) -> int: ...

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, Any]]:
        """``(images (B, C, S, S) float32, targets)`` of one epoch from ``start_batch`` on."""
        ...

    def state_dict(self) -> dict | None:
        """This process's reader position, JSON-able; None where (epoch, batch) alone say where it is."""
        ...

    def load_state_dict(self, state: dict) -> None:
        """Resume the reader where :meth:`state_dict` was taken."""
        ...

    def close(self) -> None:
        """Release reader threads and pipelines (a later :meth:`epoch` starts them again)."""
        ...


def check_batch(batch_size: int, dp: int, accum: int = 1) -> None:
    """A global batch must split evenly over data-parallel ranks and micro-batches."""
    if batch_size % (dp * accum):
        raise ConfigError(f"config: batch_size {batch_size} does not divide over {dp} data-parallel ranks (world / "
                          f"parallel.tp) x {accum} micro-batches (parallel.grad_accum); use a multiple of {dp * accum}")


def eval_format(path: str) -> str:
    """Labelled eval data is an image folder or shards written from one: tell them apart."""
    p = Path(path)
    return "webdataset" if (p / "manifest.json").exists() or any(p.glob("*.tar")) else "folder"


def jpeg_loader(cfg: Config, path: str | Source, batch_size: int, scale, flip_p: float, targets: str,
                device: torch.device, eval_transform: bool = False, shard: tuple[int, int] = (0, 1),
                log: Callable[[str], None] = functools.partial(print, flush=True), rand_aug: str | None = None,
                reprob: float = 0.0) -> Loader:
    """A PIL or DALI loader (``cfg.data.loader``) of JPEG data, sharded by data-parallel rank.

    Args:
        cfg: the run's config (data section, image size and channels, seed, grad_accum).
        path: the data's path, or an already opened :class:`~maws_fast.data.sources.Source`.
        batch_size: the GLOBAL batch; each data-parallel rank reads batch_size / dp.
        scale: RandomResizedCrop area range (training); flip_p: horizontal-flip probability.
        targets: "none" (MAE), "tags" (WSP) or "label" (evaluation).
        device: where batches are delivered (a CUDA device selects DALI's mixed decode).
        eval_transform: resize + centre crop in source order (features) instead of augmenting;
            evaluation reads everything in one process, whatever ``shard`` says.
        shard: ``(data-parallel rank, data-parallel size)`` of this process.
        log: where bad-sample lines go.
        rand_aug, reprob: a fine-tune's RandAugment policy and RandomErasing probability (training;
            both loaders run them, with the same draws).
    """
    from maws_fast.data.batching import EvalTransform, TrainAugment
    from maws_fast.data.sources import Source, open_source

    d = cfg.data
    rank, world = shard if not eval_transform else (0, 1)
    check_batch(batch_size, world, 1 if eval_transform else cfg.parallel.grad_accum)
    source = path if isinstance(path, Source) else open_source(
        eval_format(path) if eval_transform else d.format, path, d.tags, d.vocab)
    if targets == "tags" and source.num_classes == 0:
        raise ConfigError(f"config: data: WSP needs hashtags, but {path} has no vocabulary or classes; write shards "
                          "with their vocab (`maws-data shards ... --tags T.jsonl`) or pass --data.vocab")
    if eval_transform:
        aug = EvalTransform(cfg.model.img_size, d.eval_crop_frac)
    else:
        aug = TrainAugment(cfg.model.img_size, tuple(scale), flip_p=flip_p, rand_aug=rand_aug, reprob=reprob)
    kw = dict(batch_size=batch_size // world, seed=cfg.run.seed, mean=d.mean, std=d.std, transform=aug, targets=targets,
              rank=rank, world=world, shuffle=not eval_transform,
              channels=cfg.model.in_chans, max_bad=d.max_bad_samples, max_tags=d.max_tags, log=log)
    if d.loader == "pil":
        from maws_fast.data.pil_loader import PilLoader

        return PilLoader(source, num_workers=d.num_workers, **kw)
    from maws_fast.data.dali import DaliLoader

    return DaliLoader(source, device=device, settings=d.dali, **kw)
