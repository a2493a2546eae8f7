"""What the JPEG loaders (DALI and the PIL reference) share: sharding, augmentation, bad samples.

Sharding (as DALI's readers do it): the N samples are split into ``world`` contiguous shards by
GLOBAL rank, shard r being ``[floor(r N / W), floor((r + 1) N / W))``; each shard is padded by
repeating its last sample to ``batches_per_epoch * batch_size``, where ``batches_per_epoch =
ceil(ceil(N / W) / batch_size)``, so every rank runs the same number of steps.

Augmentation is a pure function of (seed, epoch, batch, rank) and the images' sizes, computed
on the host from the JPEG headers: crop boxes and flips drawn here drive both DALI's
``decoders.image_slice`` and PIL's crop, so the two loaders apply the same transform to the
same sample, and a resumed run draws the same crops.

Bad samples (the corrupt-data policy)
-------------------------------------
1. ``maws-data shards`` decodes every input while writing shards and leaves out (by name, in
   ``rejected.tsv``) what does not decode; ``maws-data verify`` re-checks existing data and
   writes a clean file list / clean indexes.
2. At training time every sample's container structure is checked before decode
   (:func:`maws_fast.data.images.inspect_image`): a truncated file or a non-image is caught by
   name. A file that passes the check but still fails to decode is found by decoding its batch
   on the host. Either way the sample is replaced, inside its batch, by the next good sample of
   that batch (so the batch keeps its size on every rank), logged with its name and reason, and
   counted; the run stops with an error listing them once more than ``max_bad`` distinct files
   were bad. The replacement is deterministic, so resume stays exact.
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np
import torch

from maws_fast.data.images import ImageInfo
from maws_fast.data.erasing import RandomErasing
from maws_fast.data.randaug import RandAugment, parse_rand_policy
from maws_fast.data.transforms import sample_crop_boxes
from maws_fast.errors import ConfigError, DataError
from maws_fast.seeds import Stream, mix_seed


@dataclass(frozen=True)
class TrainAugment:
    """RandomResizedCrop + horizontal flip (MAE: scale (0.2, 1); WSP: (0.08, 1)); for a fine-tune also
    a timm RandAugment policy after them and RandomErasing on the normalised image (:class:`FinetuneAugment`)."""

    out_size: int
    scale: tuple[float, float] = (0.2, 1.0)
    ratio: tuple[float, float] = (3 / 4, 4 / 3)
    flip_p: float = 0.5
    rand_aug: str | None = None  # e.g. "rand-m9-mstd0.5-inc1"; None: off
    reprob: float = 0.0  # RandomErasing probability ('pixel' mode, one box); 0: off

    def __post_init__(self) -> None:
        if self.out_size < 1 or not 0 < self.scale[0] <= self.scale[1] <= 1 or not 0 <= self.flip_p <= 1:
            raise ConfigError(f"augment: out_size >= 1, 0 < scale[0] <= scale[1] <= 1 and flip_p in [0, 1]; got {self}")
        if not 0 <= self.reprob <= 1:
            raise ConfigError(f"augment: reprob must be in [0, 1]; got {self.reprob}")
        if self.rand_aug is not None:
            parse_rand_policy(self.rand_aug)  # a bad policy fails here, naming the part

    @property
    def has_extras(self) -> bool:
        return self.rand_aug is not None or self.reprob > 0


class FinetuneAugment:
    """The official fine-tune's augmentation after the crop and flip, as timm's ``create_transform``
    orders it: RandAugment on each (uint8) image, then RandomErasing on the normalised tensor.

    Every sample draws from its own generators, seeded from (seed, epoch, batch, rank, index in
    the batch), so a batch is a pure function of them (exact resume, any worker).
    """

    def __init__(self, aug: TrainAugment, mean: Sequence[float]):
        self.randaug = RandAugment.from_policy(aug.rand_aug, aug.out_size, mean=_rgb(mean)) if aug.rand_aug else None
        # in place on the one copy tensors() makes of the batch
        self.erase = RandomErasing(aug.reprob, mode="pixel", max_count=1, inplace=True) if aug.reprob > 0 else None

    @classmethod
    def for_transform(cls, transform: TrainAugment | EvalTransform, mean: Sequence[float]) -> FinetuneAugment | None:
        """The extras a loader's transform asks for, or None (evaluation, MAE, WSP)."""
        if isinstance(transform, TrainAugment) and transform.has_extras:
            return cls(transform, mean)
        return None

    def images(self, pixels: list[np.ndarray], seed: int, epoch: int, batch: int, rank: int) -> list[np.ndarray]:
        """RandAugment of (H, W[, C]) uint8 images (the identity without a policy)."""
        if self.randaug is None:
            return pixels
        from PIL import Image

        out = []
        for i, px in enumerate(pixels):
            s = mix_seed(Stream.RANDAUG, seed, epoch, batch, rank, i)
            im = self.randaug(Image.fromarray(np.ascontiguousarray(px)), random.Random(s), np.random.RandomState(s % 2**32))
            out.append(np.asarray(im))
        return out

    def tensors(self, x: torch.Tensor, seed: int, epoch: int, batch: int, rank: int) -> torch.Tensor:
        """RandomErasing of normalised (B, C, H, W) images (the identity when off); a new tensor."""
        if self.erase is None:
            return x
        out = x.clone()
        for i in range(x.shape[0]):
            s = mix_seed(Stream.ERASE, seed, epoch, batch, rank, i)
            self.erase(out[i], random.Random(s), torch.Generator().manual_seed(s))  # a view: erased in place
        return out


def _rgb(mean: Sequence[float]) -> tuple[float, ...]:
    """The RandAugment fill colour's mean: one grey value stands for all three channels."""
    return tuple(mean) * 3 if len(mean) == 1 else tuple(mean)


@dataclass(frozen=True)
class EvalTransform:
    """Resize the shorter side to ``out_size / crop_frac``, then a central ``out_size`` crop."""

    out_size: int
    crop_frac: float = 0.875

    def __post_init__(self) -> None:
        if self.out_size < 1 or not 0 < self.crop_frac <= 1:
            raise ConfigError(f"eval transform: out_size >= 1 and 0 < crop_frac <= 1; got {self}")

    @property
    def resize_shorter(self) -> int:
        return int(math.floor(self.out_size / self.crop_frac + 0.5))


def batches_per_epoch(num_samples: int, world: int, batch_size: int) -> int:
    """Batches every rank runs per epoch (the largest shard, padded to whole batches)."""
    return -(-(-(-num_samples // world)) // batch_size)


def shard_size(num_samples: int, rank: int, world: int) -> int:
    """Real (unpadded) samples in the shard of ``rank``."""
    return (rank + 1) * num_samples // world - rank * num_samples // world


def real_in_batch(num_samples: int, rank: int, world: int, batch_size: int, batch: int) -> int:
    """Real samples in batch ``batch`` of an unshuffled epoch on ``rank`` (the rest is padding)."""
    return max(0, min(batch_size, shard_size(num_samples, rank, world) - batch * batch_size))


def shard_indices(order: torch.Tensor, rank: int, world: int, batch_size: int) -> torch.Tensor:
    """This rank's padded slice of an epoch's sample order (see the module docstring).

    Args:
        order: int64 ``(N,)`` the epoch's sample order.
        rank: global rank.
        world: global world size.
        batch_size: per-rank batch size.

    Returns:
        int64 ``(batches_per_epoch * batch_size,)`` sample indices.
    """
    n = order.numel()
    lo = rank * n // world
    mine = order[lo : lo + shard_size(n, rank, world)]
    total = batches_per_epoch(n, world, batch_size) * batch_size
    if mine.numel() == 0:
        raise DataError(f"rank {rank} of {world} gets no samples from a source of {n}; use fewer ranks or more data")
    return torch.cat([mine, mine[-1:].expand(total - mine.numel())])


def augment_batch(infos: Sequence[ImageInfo], seed: int, epoch: int, batch: int, rank: int,
                  aug: TrainAugment) -> tuple[torch.Tensor, torch.Tensor]:
    """Crop boxes and flips of one batch, a function of (seed, epoch, batch, rank) and sizes.

    Returns:
        ``(boxes, flips)``: int64 ``(B, 4)`` (top, left, h, w) and bool ``(B,)``.
    """
    g = torch.Generator().manual_seed(mix_seed(Stream.AUGMENT, seed, epoch, batch, rank))
    hh = torch.tensor([i.height for i in infos], dtype=torch.int64)
    ww = torch.tensor([i.width for i in infos], dtype=torch.int64)
    boxes = sample_crop_boxes(len(infos), hh, ww, g, scale=aug.scale, ratio=aug.ratio)
    flips = torch.rand(len(infos), generator=g, dtype=torch.float64) < aug.flip_p
    return boxes, flips


class BadSamples:
    """Counts, logs and caps bad samples (see the module docstring); its state is checkpointed.

    Args:
        max_bad: distinct bad files tolerated; one more stops the run with a DataError.
        log: where one line per newly found bad file goes.
        fix_hint: what the error tells the user to run (e.g. ``maws-data verify --shards DIR``).
    """

    def __init__(self, max_bad: int, log: Callable[[str], None], fix_hint: str):
        if max_bad < 0:
            raise ConfigError(f"data.max_bad_samples must be >= 0, got {max_bad}")
        self.max_bad = max_bad
        self.log = log
        self.fix_hint = fix_hint
        self.found: dict[str, str] = {}  # name -> reason, in order found
        self.replaced = 0  # sample slots replaced (a bad file met in several epochs counts each time)

    def add(self, name: str, reason: str) -> None:
        self.replaced += 1
        if name in self.found:
            return
        self.found[name] = reason
        self.log(f"[data] bad sample {name}: {reason}; replaced by another sample of its batch "
                 f"({len(self.found)} bad of at most {self.max_bad})")
        if len(self.found) > self.max_bad:
            listed = "; ".join(f"{n} ({r})" for n, r in list(self.found.items())[:5])
            raise DataError(f"{len(self.found)} bad samples, more than data.max_bad_samples={self.max_bad}: {listed}. "
                            f"Find them all with `{self.fix_hint}` and train on the clean copy it writes, "
                            "or raise data.max_bad_samples")

    def substitute(self, bad: Sequence[bool]) -> list[int]:
        """For each slot, the slot whose sample it carries: itself, or the next good slot (cyclic).

        Raises:
            DataError: when every sample of the batch is bad.
        """
        n = len(bad)
        good = [i for i in range(n) if not bad[i]]
        if not good:
            raise DataError(f"every sample of a batch of {n} is bad (e.g. {list(self.found)[:3]}); "
                            f"the data is unreadable: check it with `{self.fix_hint}`")
        out = []
        for i in range(n):
            if not bad[i]:
                out.append(i)
            else:
                out.append(next((j for j in good if j > i), good[0]))
        return out

    def state_dict(self) -> dict:
        return {"found": dict(self.found), "replaced": self.replaced}

    def load_state_dict(self, state: dict) -> None:
        self.found = dict(state.get("found", {}))
        self.replaced = int(state.get("replaced", 0))
