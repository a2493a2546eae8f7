"""The order of an epoch as a pure function: the sample at global position ``i`` of epoch ``e`` is a
function of (seed, e, i) and the shard sizes, whatever the world size, the loader or the restart.

Samples are numbered over the concatenation of all shards as given (``shard_sizes``: shard ``s``
holds ids ``[start_s, start_s + size_s)``). An epoch's order, in three seeded steps:

1. the shards are permuted (one permutation per epoch, O(shards) memory);
2. consecutive runs of ``window`` permuted shards form windows; window ``k`` covers a contiguous
   range of positions, its samples' count long;
3. inside a window the positions are permuted by a keyed bijection (a Feistel network on the next
   power of four, cycle-walked into the window's size), so a global batch mixes samples of up to
   ``window`` shards, and each shard is read while its window is current and never again that epoch
   (a node holds at most the window's shards open).

No per-sample array exists: a billion samples in 100k shards take three int64 arrays of the shard
count (a few MB) per epoch; a position costs a binary search over the windows plus the Feistel
rounds (vectorised over a batch of positions).

The global batch of step ``t`` is positions ``[t*B, (t+1)*B)``; rank ``r`` of ``W`` reads the
``r``-th of ``W`` equal slices (:func:`rank_positions`), so every world size that divides ``B`` sees the
same global batches. The resume state is :class:`SamplerState`: (seed, epoch, position), with the
config; nothing else.

Resampling at read time (``weights``): each shard's epoch size is its expected count (the sum of
its samples' weights, scaled so the epoch keeps ``target`` samples) rounded up or down by a seeded
draw, and its slots are spread over its samples by systematic resampling (evenly spaced points
with one seeded offset over the samples' cumulative weights), so each sample appears the floor or
the ceiling of its expected count in that shard's share. The shards are written once; the weights
(inverse-sqrt tag frequency, or any) are a config choice. :meth:`EpochOrder.resolve` maps a shard's
slots to its samples once the shard's weights are read.

Per-sample randomness (crops, flips, RandAugment) is keyed by :func:`sample_key` (seed, epoch,
position): never by rank or batch, so augmentation is independent of the world size too.
"""
from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from maws_fast.errors import DataError
from maws_fast.seeds import mix_seed

_M64 = np.uint64(0xFFFFFFFFFFFFFFFF)
ROUNDS = 6  # Feistel rounds: 4 suffice for a pseudo-random permutation (Luby-Rackoff); 6 for margin

# domain ids of the sampler's keys (kept apart from seeds.Stream's, which key torch generators)
_SHARDS, _WINDOW, _ROUND, _OFFSET, _SAMPLE = 0x5A01, 0x5A02, 0x5A03, 0x5A04, 0x5A05


def _splitmix(x: np.ndarray) -> np.ndarray:
    """splitmix64's finaliser, elementwise on uint64 (wrapping arithmetic)."""
    with np.errstate(over="ignore"):
        x = x + np.uint64(0x9E3779B97F4A7C15)
        x = (x ^ (x >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        x = (x ^ (x >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        return x ^ (x >> np.uint64(31))


def _bits(size: np.ndarray) -> np.ndarray:
    """The smallest ``b`` with ``2**b >= size``, exactly (float log2 can be one off near powers of two)."""
    b = np.ceil(np.log2(np.maximum(size, 1).astype(np.float64))).astype(np.int64)
    b += (np.left_shift(np.uint64(1), b.astype(np.uint64)) < size).astype(np.int64)
    too_big = (b > 0) & (np.left_shift(np.uint64(1), (b - 1).clip(0).astype(np.uint64)) >= size)
    return b - too_big.astype(np.int64)


def permute_within(j: np.ndarray, size: np.ndarray, key: np.ndarray) -> np.ndarray:
    """A keyed bijection of ``[0, size)`` applied to ``j`` (elementwise: each element has its own
    ``size`` and ``key``): a Feistel network on the next power of four at least ``size``, cycle-walked
    until the value falls inside (fewer than four walks on average)."""
    j = np.asarray(j, dtype=np.uint64)
    size = np.broadcast_to(np.asarray(size, dtype=np.uint64), j.shape)
    key = np.broadcast_to(np.asarray(key, dtype=np.uint64), j.shape)
    out = j.copy()
    # half_bits per element: the smallest h with 4**h >= size (size 1 -> h 0 is the identity)
    need = size > np.uint64(1)
    half = np.where(need, (_bits(size) + 1) // 2, 0)
    for h in np.unique(half[need]):
        sel = need & (half == h)
        k = key[sel]
        rk = [_splitmix(k ^ np.uint64(mix_seed(_ROUND, r))) for r in range(ROUNDS)]
        x, s = out[sel], size[sel]
        todo = np.ones(x.shape, dtype=bool)
        while todo.any():
            x[todo] = _feistel(x[todo], int(h), [r[todo] for r in rk])
            todo = x >= s
        out[sel] = x
    return out


def _feistel(x: np.ndarray, half_bits: int, keys: list[np.ndarray]) -> np.ndarray:
    mask = np.uint64((1 << half_bits) - 1)
    hb = np.uint64(half_bits)
    left, right = x >> hb, x & mask
    for k in keys:
        left, right = right, left ^ (_splitmix(right ^ k) & mask)
    return (left << hb) | right


def sample_key(seed: int, epoch: int, position: np.ndarray | int) -> np.ndarray:
    """The key of a sample's own random draws (crop, flip, RandAugment, erasing): a function of (seed,
    epoch, global position) only."""
    base = np.uint64(mix_seed(_SAMPLE, seed, epoch))
    return _splitmix(np.asarray(position, dtype=np.uint64) ^ base)


@dataclass(frozen=True)
class SamplerState:
    """Where a run is in its data: all a resume needs, with the config."""

    seed: int
    epoch: int
    position: int  # global positions consumed in this epoch (a multiple of the global batch)


def rank_positions(step: int, batch: int, rank: int, world: int) -> np.ndarray:
    """The global positions rank ``rank`` of ``world`` reads at ``step``: its slice of the global batch
    ``[step*batch, (step+1)*batch)``."""
    if world < 1 or batch % world:
        raise DataError(f"the global batch {batch} does not split over {world} ranks; use a world size that "
                        f"divides it (or a batch that {world} divides)")
    per = batch // world
    start = step * batch + rank * per
    return np.arange(start, start + per, dtype=np.int64)


class EpochOrder:
    """The order of one epoch over shards of the given sizes (see the module docstring).

    Args:
        shard_sizes: samples per shard, in their canonical order (the concatenation of all sources).
        seed, epoch: the order's key.
        window: shards per window (the shuffle's reach and the open-shard bound).
        weights_per_shard: with resampling, each shard's total weight (sum of its samples' weights);
            None: every sample once.
        target: with resampling, the epoch's expected length (default: the number of samples).
    """

    def __init__(self, shard_sizes, seed: int, epoch: int, window: int = 64,
                 weights_per_shard=None, target: int | None = None):
        sizes = np.asarray(shard_sizes, dtype=np.int64)
        if sizes.ndim != 1 or len(sizes) == 0 or (sizes < 0).any():
            raise DataError("shard sizes must be a non-empty list of sample counts >= 0")
        if window < 1:
            raise DataError(f"the shuffle window must hold at least one shard, got {window}")
        self.seed, self.epoch, self.window = int(seed), int(epoch), int(window)
        self.starts = np.concatenate([[0], np.cumsum(sizes)[:-1]])  # canonical first id of each shard
        self.num_samples = int(sizes.sum())
        self.resampled = weights_per_shard is not None
        if self.resampled:
            w = np.asarray(weights_per_shard, dtype=np.float64)
            if w.shape != sizes.shape or (w < 0).any() or not np.isfinite(w).all() or w.sum() <= 0:
                raise DataError("resampling weights: one finite total >= 0 per shard, not all zero")
            goal = self.num_samples if target is None else int(target)
            self.expected = w * (goal / w.sum())  # each shard's expected count this epoch
            u = _uniform(_splitmix(np.arange(len(sizes), dtype=np.uint64) ^ np.uint64(mix_seed(_OFFSET, seed, epoch))))
            frac = self.expected - np.floor(self.expected)
            slots = np.floor(self.expected).astype(np.int64) + (u < frac)
            self.slots = np.where(sizes > 0, slots, 0)
        else:
            self.slots = sizes
        rng = np.random.default_rng(mix_seed(_SHARDS, seed, epoch))
        self.perm = rng.permutation(len(sizes))  # position in the epoch -> shard
        ordered = self.slots[self.perm]
        self.pos_starts = np.concatenate([[0], np.cumsum(ordered)])  # first position of each permuted shard
        self.length = int(self.pos_starts[-1])
        self.win_starts = self.pos_starts[::window]  # first position of each window (+ the end, maybe)
        if self.win_starts[-1] != self.length:
            self.win_starts = np.append(self.win_starts, self.length)
        self._win_key = np.uint64(mix_seed(_WINDOW, seed, epoch))

    def __len__(self) -> int:
        return self.length

    def state_bytes(self) -> int:
        """Memory of this epoch's order (its arrays)."""
        arrays = (self.starts, self.slots, self.perm, self.pos_starts, self.win_starts)
        return sum(a.nbytes for a in arrays) + (self.expected.nbytes if self.resampled else 0)

    def locate(self, positions) -> tuple[np.ndarray, np.ndarray]:
        """(shard, slot within the shard) at each global position of this epoch. Without resampling
        the slot is the sample's offset in its shard; with it, :meth:`resolve` maps slots to samples."""
        p = np.asarray(positions, dtype=np.int64)
        if p.size and (p.min() < 0 or p.max() >= self.length):
            raise DataError(f"position out of range: the epoch holds {self.length} positions")
        k = np.searchsorted(self.win_starts, p, side="right") - 1  # the window
        lo = self.win_starts[k]
        size = self.win_starts[k + 1] - lo
        key = _splitmix(k.astype(np.uint64) ^ self._win_key)
        local = permute_within((p - lo).astype(np.uint64), size, key).astype(np.int64) + lo
        j = np.searchsorted(self.pos_starts, local, side="right") - 1  # the permuted shard
        return self.perm[j], local - self.pos_starts[j]

    def sample_ids(self, positions) -> np.ndarray:
        """The canonical sample id at each global position (no resampling: every id once per epoch)."""
        if self.resampled:
            raise DataError("a resampled order maps positions to shard slots: use locate() and resolve()")
        shard, slot = self.locate(positions)
        return self.starts[shard] + slot

    def resolve(self, shard: int, slots, sample_weights) -> np.ndarray:
        """Offsets within ``shard`` of the samples at ``slots`` of a resampled order, given that shard's
        per-sample weights: systematic resampling with one seeded offset per (seed, epoch, shard)."""
        w = np.asarray(sample_weights, dtype=np.float64)
        n = int(self.slots[shard])
        if n == 0:
            raise DataError(f"shard {shard} has no slots this epoch")
        cum = np.cumsum(w)
        total = cum[-1]
        v = _uniform(_splitmix(np.uint64(shard) ^ np.uint64(mix_seed(_OFFSET + 1, self.seed, self.epoch))))
        points = (np.asarray(slots, dtype=np.float64) + float(v)) * (total / n)
        return np.minimum(np.searchsorted(cum, points, side="right"), len(w) - 1)


def _uniform(bits: np.ndarray) -> np.ndarray:
    """uint64 -> float64 in [0, 1) from the top 53 bits."""
    return (np.asarray(bits, dtype=np.uint64) >> np.uint64(11)).astype(np.float64) * (1.0 / (1 << 53))
