"""Seeds: the random streams of training are seeded with ``mix_seed`` of ``run.seed`` and a named id.

Nothing in the training loop draws from a shared RNG stream: each batch (order, crops, flips) and
each step (MAE masking) seeds its own ``torch.Generator`` from ``run.seed``, a :class:`Stream` id
and its epoch / batch / step / rank, so a resumed run draws exactly what an uninterrupted one
does. Model init seeds the global generator with ``mix_seed(seed, Stream.*_INIT)`` just before
the model is built (the same weights on every rank). The demo data's hashtags and the probes
(linear probe, k-shot trials) are seeded from ``run.seed`` directly, in their own modules.

The stream values, and the order of the parts at each call site, fix every run's numbers:
changing one changes what a seed trains. Per-batch / per-step streams put the stream id first
(``mix_seed(Stream.MASK, seed, step)``); once-per-run streams put it after the seed
(``mix_seed(seed, Stream.MAE_INIT)``).
"""
from __future__ import annotations

from enum import IntEnum

_MASK64 = (1 << 64) - 1


class Stream(IntEnum):
    """Domain ids that keep the ``mix_seed`` streams of a run apart."""

    PERMUTATION = 1  # sample order of an epoch (reference and PIL loaders)
    AUGMENT = 2  # crop boxes and flips of one batch
    MASK = 3  # MAE masking noise of one optimizer step (drawn for the global batch)
    MIXUP = 4  # fine-tune Mixup / CutMix draws of one micro-batch on one rank
    DROP_PATH = 5  # fine-tune stochastic-depth draws of one micro-batch on one rank
    RANDAUG = 6  # fine-tune RandAugment of one sample (ops, magnitudes, signs)
    ERASE = 7  # fine-tune RandomErasing of one sample (box and noise)
    MAE_INIT = 11  # weights of the MAE model (the same on every rank)
    WSP_INIT = 12  # weights of the WSP classifier (the same for every WSP variant of a run)
    FT_INIT = 14  # weights of the fine-tune classifier (its head; the encoder comes from a checkpoint)
    LIT_INIT = 15  # weights of the LiT text tower and projections (the image tower comes from a checkpoint)
    CAPTIONS = 16  # the demo's captions written from the weak hashtags
    EVAL_SUBSET = 13  # the train-split subset the frozen-feature probes fit on
    DALI_PIPELINE = 21  # DALI's own pipeline seed (its reader shuffle buffer)
    FOLDER_ORDER = 23  # the one permutation of an image folder handed to DALI's file reader


def mix_seed(*parts: int) -> int:
    """Hashes integers into one 63-bit generator seed (splitmix64 finaliser per part).

    Why not ``seed * P + epoch``: torch's CPU generator only uses the low 32 bits of its seed,
    so seeds must be well mixed in those bits for (seed, epoch, batch) triples not to collide.
    """
    h = 0x9E3779B97F4A7C15
    for p in parts:
        h = (h ^ (int(p) & _MASK64)) & _MASK64
        h = (h + 0x9E3779B97F4A7C15) & _MASK64
        h = ((h ^ (h >> 30)) * 0xBF58476D1CE4E5B9) & _MASK64
        h = ((h ^ (h >> 27)) * 0x94D049BB133111EB) & _MASK64
        h ^= h >> 31
    return h >> 1
