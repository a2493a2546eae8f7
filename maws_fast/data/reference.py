"""The plain-torch reference loader: in-memory uint8 images -> normalised, augmented batches.

It implements :class:`maws_fast.data.loader.Loader`, as the PIL and DALI JPEG loaders do.

Determinism contract: the sample order of an epoch is a function of (seed, epoch) only, and the
augmentation of batch b a function of (seed, epoch, b) only. Each batch is built from its own
freshly seeded generator, never from a stream shared across batches, so a run resumed at
(epoch, start_batch) sees bit-identical batches to an uninterrupted one, whatever
``num_workers`` is.
"""

from __future__ import annotations

from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset

from maws_fast.data.batching import FinetuneAugment
from maws_fast.data.transforms import normalize, random_resized_crop_flip
from maws_fast.errors import ConfigError, DataError
from maws_fast.seeds import Stream, mix_seed

_AUGMENT_KEYS = {"scale", "ratio", "flip_p", "out_size"}


class _EpochBatches(Dataset):
    """One epoch as a map-style dataset whose items are whole batches, from ``start_batch`` on.

    Every item is computed from (seed, epoch, batch index) alone, so any worker can make any
    batch and the DataLoader can prefetch freely.
    """

    def __init__(self, loader: BatchLoader, order: torch.Tensor, epoch: int, start_batch: int):
        self.loader = loader
        self.order = order  # (N,) sample indices for this epoch
        self.epoch = epoch
        self.start_batch = start_batch

    def __len__(self) -> int:
        return self.loader.num_batches - self.start_batch

    def __getitem__(self, k: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        ld = self.loader
        b = self.start_batch + k
        idx = self.order[b * ld.batch_size : (b + 1) * ld.batch_size]  # (B,)
        x = normalize(ld.images[idx], ld.mean, ld.std)  # (B, C, H, W) float32
        if ld.augment is not None:
            g = torch.Generator().manual_seed(mix_seed(Stream.AUGMENT, ld.seed, self.epoch, b))
            x = random_resized_crop_flip(x, generator=g, **ld.augment)  # (B, C, S, S)
            if ld.extras is not None:
                x = _finetune_extras(x, ld, self.epoch, b)
        y = None if ld.targets is None else ld.targets[idx]
        rank, world = ld.shard
        if world > 1:  # this rank's rows of the global batch
            b = x.shape[0] // world
            x = x[rank * b:(rank + 1) * b].contiguous()
            y = None if y is None else y[rank * b:(rank + 1) * b]
        return x, y


def _finetune_extras(x: torch.Tensor, ld: BatchLoader, epoch: int, batch: int) -> torch.Tensor:
    """RandAugment on the uint8 images of the normalised batch, then RandomErasing (rank 0's draws:
    the batch is the global one, sliced per rank afterwards)."""
    mean = torch.as_tensor(ld.mean, dtype=x.dtype).reshape(1, -1, 1, 1)
    std = torch.as_tensor(ld.std, dtype=x.dtype).reshape(1, -1, 1, 1)
    if ld.extras.randaug is not None:
        u8 = (x * std + mean).mul_(255).round_().clamp_(0, 255).to(torch.uint8)  # (B, C, S, S)
        px = [a[..., 0] if a.shape[-1] == 1 else a for a in u8.permute(0, 2, 3, 1).numpy()]
        out = np.stack(ld.extras.images(px, ld.seed, epoch, batch, 0))
        out = torch.from_numpy(out.reshape(*out.shape[:3], -1)).permute(0, 3, 1, 2)  # (B, C, S, S)
        x = (out.float().div_(255) - mean) / std
    return ld.extras.tensors(x, ld.seed, epoch, batch, 0)


class _InMemory:
    """The rest of the Loader interface (maws_fast.data.loader) for loaders of tensors in memory:
    batches are a function of (seed, epoch, batch) and nothing is decoded, so there is no reader
    state and no bad sample."""

    bad = None

    def state_dict(self) -> None:
        return None

    def load_state_dict(self, state: dict) -> None:
        pass

    def close(self) -> None:
        pass


class BatchLoader(_InMemory):
    """Batches of normalised (and optionally augmented) images with their targets.

    Args:
        images: uint8 ``(N, H, W)`` or ``(N, C, H, W)``.
        targets: ``(N, ...)`` per-sample targets (labels, soft tags) sliced alongside, or None.
        batch_size: samples per batch.
        seed: base seed of the permutation and the augmentation.
        mean: per-channel mean of the [0, 1] pixels (float or C floats).
        std: per-channel standard deviation (float or C floats).
        augment: None for eval (normalise only), else a dict with ``out_size`` (int), ``scale``
            (tuple) and ``flip_p`` (float), and optionally ``ratio`` (tuple), passed to
            :func:`~maws_fast.data.transforms.random_resized_crop_flip`.
        drop_last: drop the last, smaller batch.
        num_workers: DataLoader worker processes building batches ahead of time.
        shuffle: permute the samples each epoch; False keeps their order (eval, features).
        shard: ``(rank, world)``: yield rows ``[rank*b, (rank+1)*b)`` of each batch, b = batch_size /
            world (data parallel). The whole batch is augmented and then sliced, so every rank's
            share is exactly what a one-process run of the same batch sees.
        extras: a fine-tune's RandAugment + RandomErasing after the crop and flip (the cropped
            images are quantised to uint8 for RandAugment's PIL ops, as a JPEG loader's are).
    """

    def __init__(
        self,
        images: torch.Tensor,
        targets: torch.Tensor | None,
        batch_size: int,
        seed: int,
        mean: float | Sequence[float],
        std: float | Sequence[float],
        augment: dict[str, Any] | None = None,
        drop_last: bool = True,
        num_workers: int = 0,
        shuffle: bool = True,
        shard: tuple[int, int] = (0, 1),
        extras: FinetuneAugment | None = None,
    ) -> None:
        if images.dtype != torch.uint8 or images.ndim not in (3, 4):
            raise DataError(
                f"BatchLoader needs uint8 images (N, H, W) or (N, C, H, W), got {images.dtype} "
                f"{tuple(images.shape)}; load them with maws_fast.data.fmnist.load_fmnist."
            )
        n = images.shape[0]
        if n == 0:
            raise DataError("BatchLoader got an empty image set; check the --data path and split.")
        if targets is not None and targets.shape[0] != n:
            raise DataError(
                f"BatchLoader got {n} images but {targets.shape[0]} targets; pass one target "
                "per image."
            )
        if batch_size < 1:
            raise DataError(f"batch_size must be >= 1, got {batch_size}.")
        if drop_last and batch_size > n:
            raise DataError(
                f"batch_size {batch_size} is larger than the {n} samples, so drop_last leaves "
                "zero batches; lower the batch size or use more data."
            )
        if num_workers < 0:
            raise DataError(f"num_workers must be >= 0, got {num_workers}.")
        rank, world = shard
        if not 0 <= rank < world or batch_size % world:
            raise ConfigError(f"batch_size {batch_size} does not split over {world} data-parallel ranks (rank {rank}); "
                              f"use a multiple of {world}.")
        if augment is not None:
            augment = dict(augment)
            unknown = set(augment) - _AUGMENT_KEYS
            if unknown or "out_size" not in augment:
                raise ConfigError(
                    f"augment keys {sorted(augment)} are invalid: it needs 'out_size' and allows "
                    f"only {sorted(_AUGMENT_KEYS)}."
                )
            augment["out_size"] = int(augment["out_size"])
            for key in ("scale", "ratio"):
                if key in augment:
                    augment[key] = tuple(float(v) for v in augment[key])

        self.images = images.contiguous()
        self.targets = targets
        self.batch_size = int(batch_size)
        self.seed = int(seed)
        self.mean = mean
        self.std = std
        self.augment = augment
        self.drop_last = drop_last
        self.num_workers = int(num_workers)
        self.shuffle = shuffle
        self.shard = (int(rank), int(world))
        self.extras = extras

    @property
    def num_samples(self) -> int:
        """Number of samples N."""
        return self.images.shape[0]

    @property
    def num_batches(self) -> int:
        """Batches per epoch."""
        n, bs = self.num_samples, self.batch_size
        return n // bs if self.drop_last else -(-n // bs)

    def __len__(self) -> int:
        return self.num_batches


    def order(self, epoch: int) -> torch.Tensor:
        """The sample order of an epoch, a function of (seed, epoch) only.

        Args:
            epoch: epoch index.

        Returns:
            int64 ``(N,)`` sample indices.
        """
        if not self.shuffle:
            return torch.arange(self.num_samples)
        g = torch.Generator().manual_seed(mix_seed(Stream.PERMUTATION, self.seed, epoch))
        return torch.randperm(self.num_samples, generator=g)

    def epoch(
        self, epoch: int, start_batch: int = 0
    ) -> Iterator[tuple[torch.Tensor, torch.Tensor | None]]:
        """Iterates over the batches of one epoch, from ``start_batch`` on.

        Args:
            epoch: epoch index (selects the permutation and augmentation).
            start_batch: first batch to yield, in ``0..num_batches`` (``num_batches`` yields
                nothing: the epoch was already finished).

        Yields:
            ``(images, targets)``: float32 ``(B, C, H, W)`` normalised (``(B, C, S, S)`` when
            augmenting) and the matching targets slice, or None when there are no targets.
        """
        if not 0 <= start_batch <= self.num_batches:
            raise DataError(
                f"start_batch {start_batch} is outside 0..{self.num_batches} (batches per epoch "
                "of this loader); the checkpoint was likely saved with another batch size or "
                "data set: resume with the same data and batch_size."
            )
        dataset = _EpochBatches(self, self.order(epoch), epoch, start_batch)
        # The batch is made in __getitem__, so batch_size=None (no collation); the main
        # process just receives finished batches, num_workers of them being built ahead.
        loader = DataLoader(
            dataset,
            batch_size=None,
            shuffle=False,
            num_workers=self.num_workers,
            persistent_workers=False,
        )
        yield from loader


class PairLoader(_InMemory):
    """Batches of (image inputs, caption ids) for the LiT stage, from tensors in memory.

    ``inputs`` are the locked image tower's pooled features (N, W) when the data does not augment
    (the feature cache: each image through the tower once, not once per epoch), or anything else
    indexable by rows. They may be given as a function computing them, called on the first
    :meth:`epoch` (a finished or resumed stage that never asks pays nothing). The order is a
    function of (seed, epoch), as :class:`BatchLoader`'s; ``shard`` slices each global batch the same way.
    """

    def __init__(self, inputs, ids: torch.Tensor, batch_size: int, seed: int, shard: tuple[int, int] = (0, 1)):
        n = ids.shape[0]
        rank, world = shard
        if n == 0:
            raise DataError("PairLoader got no captions; check the LiT data (lit.num_samples, the caption files)")
        if batch_size < 1 or batch_size > n:
            raise DataError(f"lit batch_size {batch_size} must be in 1..{n} (the image-caption pairs); lower it or use "
                            "more data")
        if not 0 <= rank < world or batch_size % world:
            raise ConfigError(f"batch_size {batch_size} does not split over {world} data-parallel ranks (rank {rank}); "
                              f"use a multiple of {world}.")
        self._inputs, self.ids = inputs, ids
        self.batch_size, self.seed, self.shard = int(batch_size), int(seed), (int(rank), int(world))

    @property
    def num_samples(self) -> int:
        return self.ids.shape[0]

    @property
    def num_batches(self) -> int:
        return self.num_samples // self.batch_size

    def inputs(self) -> torch.Tensor:
        if callable(self._inputs):
            self._inputs = self._inputs()
            if self._inputs.shape[0] != self.num_samples:
                raise DataError(f"the LiT image inputs have {self._inputs.shape[0]} rows for {self.num_samples} captions")
        return self._inputs

    def epoch(self, epoch: int, start_batch: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        if not 0 <= start_batch <= self.num_batches:
            raise DataError(f"start_batch {start_batch} is outside 0..{self.num_batches}; resume with the same data "
                            "and batch_size")
        x = self.inputs()
        g = torch.Generator().manual_seed(mix_seed(Stream.PERMUTATION, self.seed, epoch))
        order = torch.randperm(self.num_samples, generator=g)
        rank, world = self.shard
        b = self.batch_size // world
        for i in range(start_batch, self.num_batches):
            rows = order[i * self.batch_size:(i + 1) * self.batch_size][rank * b:(rank + 1) * b]
            yield x[rows], self.ids[rows]
