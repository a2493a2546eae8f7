"""Fashion-MNIST: the demo data, and the weak-hashtag data derived from it for the WSP stage.

Images come from Debian's ``dataset-fashion-mnist`` package (``/usr/share/datasets/fashion-mnist``,
four gzip'd IDX files). They are parsed here with numpy; nothing is cached on disk.

Weak hashtags (the WSP demo data)
---------------------------------
MAWS's weakly supervised pretraining learns from noisy, multi-label hashtags. The demo imitates
that with a deterministic process over Fashion-MNIST, implemented by :func:`make_weak_hashtags`:

* Vocabulary ``VOCAB`` (14 tags): the 10 class tags in label order (``tshirt``, ``trouser``,
  ``pullover``, ``dress``, ``coat``, ``sandal``, ``shirt``, ``sneaker``, ``bag``, ``ankle_boot``)
  followed by 4 coarse super-tags: ``top`` = {tshirt, pullover, coat, shirt}, ``footwear`` =
  {sandal, sneaker, ankle_boot}, ``legwear_dress`` = {trouser, dress}, ``accessory`` = {bag}.
* All randomness comes from one ``torch.Generator`` seeded with ``seed``, so the output is a pure
  function of (images, labels, num, seed, drop_p, wrong_p).
* For each output sample: k ~ uniform{1, 2, 3, 4}; k source images are drawn uniformly, with
  replacement, from the given set.

  - k == 1: the mosaic is the source image itself at full size (28x28).
  - k >= 2: the mosaic is a 2x2 grid of 14x14 cells; each source is downsampled 2x by 2x2 average
    pooling, rounded half up to uint8 (``(sum + 2) // 4``), and placed in one of k distinct
    cells chosen uniformly at random; the remaining cells are 0 (black).

* True tags = the class tags of the sources present plus their super-tags (a set: duplicates
  collapse).
* Label noise, applied to the true tags:

  1. each true tag is dropped independently with probability ``drop_p``; if every true tag was
     dropped, one true tag chosen uniformly at random is kept, so no sample is tagless;
  2. then, with probability ``wrong_p``, one wrong tag, chosen uniformly among the tags that are
     not true for the sample, is added.

  So a true tag survives with probability ``1 - drop_p`` except for the keep-one rule: a sample
  with t true tags keeps ``(1 - drop_p) * t + drop_p ** t`` of them on average, and exactly a
  fraction ``wrong_p`` of samples (in expectation) carries one wrong tag.

:func:`tag_targets` turns the multi-hot tags into the WSP soft target (each row divided by its
tag count, so it sums to 1), as in MAWS's softmax cross-entropy over hashtags.

Captions (the LiT demo data)
----------------------------
:func:`make_captions` writes one English caption per sample FROM ITS NOISY TAGS, so captions
carry exactly the tags' noise (a dropped item is not mentioned, a wrong tag is). With one
``torch.Generator`` seeded with ``seed``: the class tags present are named in a random order
("a sneaker", "an ankle boot"), joined as "x", "x and y" or "x, y and z"; super-tags present
follow as words ("footwear", "a top", "legwear or dresses", "an accessory"); a sample with only
super-tags is captioned by them alone. The sentence is one of :data:`CAPTION_TEMPLATES`, chosen
uniformly, e.g. "a photo of a sneaker and a bag, footwear, an accessory.".
"""

from __future__ import annotations

import gzip
import os
import zlib

import numpy as np
import torch

from maws_fast.errors import DataError

DEFAULT_ROOT = "/usr/share/datasets/fashion-mnist"

CLASSES: tuple[str, ...] = (
    "T-shirt/top",
    "Trouser",
    "Pullover",
    "Dress",
    "Coat",
    "Sandal",
    "Shirt",
    "Sneaker",
    "Bag",
    "Ankle boot",
)

# Pixel statistics of the training images scaled to [0, 1].
MEAN = 0.2860
STD = 0.3530

CLASS_TAGS: tuple[str, ...] = (
    "tshirt",
    "trouser",
    "pullover",
    "dress",
    "coat",
    "sandal",
    "shirt",
    "sneaker",
    "bag",
    "ankle_boot",
)
SUPER_TAGS: dict[str, tuple[str, ...]] = {
    "top": ("tshirt", "pullover", "coat", "shirt"),
    "footwear": ("sandal", "sneaker", "ankle_boot"),
    "legwear_dress": ("trouser", "dress"),
    "accessory": ("bag",),
}
VOCAB: tuple[str, ...] = CLASS_TAGS + tuple(SUPER_TAGS)

# label -> index in VOCAB of its super-tag.
_SUPER_OF_CLASS = torch.tensor(
    [
        len(CLASS_TAGS) + next(i for i, members in enumerate(SUPER_TAGS.values()) if tag in members)
        for tag in CLASS_TAGS
    ],
    dtype=torch.int64,
)

_FILES = {
    "train": ("train-images-idx3-ubyte.gz", "train-labels-idx1-ubyte.gz"),
    "test": ("t10k-images-idx3-ubyte.gz", "t10k-labels-idx1-ubyte.gz"),
}
_IMAGES_MAGIC = 2051  # 0x00000803: unsigned bytes, 3 dims
_LABELS_MAGIC = 2049  # 0x00000801: unsigned bytes, 1 dim
_INSTALL_HINT = (
    "install it with `sudo apt-get install dataset-fashion-mnist` or pass --data DIR pointing at "
    "the four IDX .gz files"
)


def _read_idx(path: str, magic: int) -> np.ndarray:
    """Reads one gzip'd IDX file of unsigned bytes and checks it against its header.

    Args:
        path: the ``.gz`` file.
        magic: the expected magic number (2051 for images, 2049 for labels).

    Returns:
        A uint8 array shaped as the header says.
    """
    ndim = magic & 0xFF
    try:
        with gzip.open(path, "rb") as f:
            raw = f.read()
    except FileNotFoundError:
        raise DataError(f"Fashion-MNIST file {path} is missing; {_INSTALL_HINT}.") from None
    except (OSError, EOFError, zlib.error) as e:
        # BadGzipFile is an OSError; a truncated stream raises EOFError.
        raise DataError(
            f"Fashion-MNIST file {path} is corrupt or truncated ({e}); reinstall it with "
            "`sudo apt-get install --reinstall dataset-fashion-mnist` or replace the file."
        ) from None

    header = 4 + 4 * ndim
    if len(raw) < header:
        raise DataError(
            f"Fashion-MNIST file {path} is too short for an IDX header ({len(raw)} bytes); "
            "replace the file with an intact copy."
        )
    found = int.from_bytes(raw[:4], "big")
    if found != magic:
        raise DataError(
            f"Fashion-MNIST file {path} has IDX magic number {found}, expected {magic}; it is not "
            "the right file or is corrupt: replace it with an intact copy."
        )
    dims = tuple(int(d) for d in np.frombuffer(raw, dtype=">u4", count=ndim, offset=4))
    expected = header + int(np.prod(dims))
    if len(raw) != expected:
        raise DataError(
            f"Fashion-MNIST file {path} holds {len(raw)} bytes but its header {dims} needs "
            f"{expected}; the file is truncated or corrupt: replace it with an intact copy."
        )
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(dims)


def load_fmnist(root: str | None, split: str) -> tuple[torch.Tensor, torch.Tensor]:
    """Loads one split of Fashion-MNIST from its four IDX ``.gz`` files.

    Args:
        root: directory holding the IDX files; None means :data:`DEFAULT_ROOT`.
        split: ``"train"`` (60000 images) or ``"test"`` (10000 images).

    Returns:
        ``(images, labels)``: uint8 ``(N, 28, 28)`` and int64 ``(N,)`` with values in 0..9.
    """
    if split not in _FILES:
        raise DataError(f"Unknown Fashion-MNIST split {split!r}; use 'train' or 'test'.")
    root = DEFAULT_ROOT if root is None else str(root)
    if not os.path.isdir(root):
        raise DataError(f"Fashion-MNIST directory {root} is missing; {_INSTALL_HINT}.")
    img_name, lbl_name = _FILES[split]
    img_path, lbl_path = os.path.join(root, img_name), os.path.join(root, lbl_name)
    for path in (img_path, lbl_path):
        # Check both up front so the message names the first missing file, not a parse error.
        if not os.path.isfile(path):
            raise DataError(f"Fashion-MNIST file {path} is missing; {_INSTALL_HINT}.")

    images = _read_idx(img_path, _IMAGES_MAGIC)  # (N, H, W)
    labels = _read_idx(lbl_path, _LABELS_MAGIC)  # (N,)
    if images.shape[0] != labels.shape[0]:
        raise DataError(
            f"Fashion-MNIST files {img_path} ({images.shape[0]} images) and {lbl_path} "
            f"({labels.shape[0]} labels) disagree; replace them with an intact matching pair."
        )
    if labels.size and int(labels.max()) >= len(CLASSES):
        raise DataError(
            f"Fashion-MNIST file {lbl_path} holds label {int(labels.max())} outside 0..9; "
            "replace it with an intact copy."
        )
    # np.frombuffer views read-only bytes: copy so torch owns writable memory.
    return torch.from_numpy(images.copy()), torch.from_numpy(labels.astype(np.int64))


def _pool2x(images: torch.Tensor) -> torch.Tensor:
    """2x2 average pooling of uint8 images, rounded half up. ``(N, H, W) -> (N, H/2, W/2)``."""
    x = images.to(torch.int16)  # 4 * 255 + 2 fits in int16
    # Strided adds instead of reshape(...).sum((2, 4)): several times faster on CPU.
    s = x[:, 0::2, 0::2] + x[:, 0::2, 1::2] + x[:, 1::2, 0::2] + x[:, 1::2, 1::2] + 2
    return torch.div(s, 4, rounding_mode="floor").to(torch.uint8)


def make_weak_hashtags(
    images: torch.Tensor,
    labels: torch.Tensor,
    num: int,
    seed: int,
    drop_p: float = 0.3,
    wrong_p: float = 0.1,
    return_sources: bool = False,
) -> (
    tuple[torch.Tensor, torch.Tensor]
    | tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]
):
    """Builds the weak-hashtag WSP data (mosaics + noisy multi-hot tags); see the module docstring.

    Args:
        images: uint8 ``(N, 28, 28)`` source images.
        labels: int64 ``(N,)`` class labels in 0..9.
        num: number of samples to make.
        seed: seeds the one ``torch.Generator`` that drives every random choice.
        drop_p: probability that each true tag is dropped.
        wrong_p: probability that a sample gets one wrong tag.
        return_sources: also return the sources, for tests and inspection.

    Returns:
        ``(mosaics, tags)``: uint8 ``(num, 28, 28)`` and float32 multi-hot ``(num, len(VOCAB))``.
        With ``return_sources`` also ``sources`` int64 ``(num, 4)`` and ``full`` bool ``(num,)``:
        for a mosaic (``full`` False) ``sources[i, c]`` is the index of the image in cell c
        (row-major: 0 top-left, 1 top-right, 2 bottom-left, 3 bottom-right) or -1 if empty; for
        a full-size sample (``full`` True, k == 1) ``sources[i] = [index, -1, -1, -1]``.
    """
    odd = images.ndim == 3 and (images.shape[1] % 2 or images.shape[2] % 2)
    if images.ndim != 3 or images.dtype != torch.uint8 or odd:
        raise DataError(
            f"make_weak_hashtags needs uint8 images (N, H, W) with even H and W, got "
            f"{images.dtype} {tuple(images.shape)}; pass the output of load_fmnist."
        )
    if labels.shape != images.shape[:1]:
        raise DataError(
            f"make_weak_hashtags got {images.shape[0]} images but labels of shape "
            f"{tuple(labels.shape)}; pass matching images and labels."
        )
    if images.shape[0] == 0 or num < 1:
        raise DataError(
            f"make_weak_hashtags needs at least one source image and num >= 1 (got "
            f"{images.shape[0]} images, num={num})."
        )
    if not (0.0 <= drop_p <= 1.0 and 0.0 <= wrong_p <= 1.0):
        raise DataError(f"drop_p and wrong_p must lie in [0, 1], got {drop_p} and {wrong_p}.")

    n, h, w = images.shape
    v = len(VOCAB)
    labels = labels.to(torch.int64)
    g = torch.Generator().manual_seed(int(seed))
    # Every draw below is made for every sample (used or not), in a fixed order, so the result
    # depends only on the seed and never on which branch a sample takes.
    k = torch.randint(1, 5, (num,), generator=g)  # (num,)
    src = torch.randint(0, n, (num, 4), generator=g)  # (num, 4): source j used iff j < k
    cell_of = torch.rand(num, 4, generator=g).argsort(dim=1)  # (num, 4): cell of source j
    drop_u = torch.rand(num, v, generator=g)  # (num, V)
    keep_u = torch.rand(num, v, generator=g)  # (num, V): picks the kept tag if all dropped
    wrong_u = torch.rand(num, generator=g)  # (num,)
    wrong_pick_u = torch.rand(num, v, generator=g)  # (num, V)

    used = torch.arange(4).unsqueeze(0) < k.unsqueeze(1)  # (num, 4)
    full = k == 1  # (num,)

    # Cell table: sources[i, cell_of[i, j]] = src[i, j] for the used sources.
    sources = torch.full((num, 4), -1, dtype=torch.int64)
    sources.scatter_(1, cell_of, torch.where(used, src, -1))
    # Full-size samples keep their one source in column 0, not in a random cell.
    sources[full] = torch.tensor([-1, -1, -1, -1])
    sources[full, 0] = src[full, 0]

    # Mosaics: gather pooled cells and tile them 2x2; full-size samples are copied whole.
    pooled = _pool2x(images)  # (N, H/2, W/2)
    cells = pooled[sources.clamp(min=0)]  # (num, 4, H/2, W/2)
    cells = cells * (sources >= 0).to(torch.uint8)[:, :, None, None]  # empty cells -> 0
    mosaics = cells.reshape(num, 2, 2, h // 2, w // 2).permute(0, 1, 3, 2, 4).reshape(num, h, w)
    mosaics[full] = images[src[full, 0]]

    # True tags: class tag + super-tag of each used source (a set, via scatter of ones).
    src_labels = labels[src]  # (num, 4)
    tag_idx = torch.cat([src_labels, _SUPER_OF_CLASS[src_labels]], dim=1)  # (num, 8)
    # scatter_add, not scatter_: an unused source may share an index with a used one, and plain
    # scatter_ with duplicate indices keeps an unspecified one of the written values.
    counts = torch.zeros(num, v, dtype=torch.int32)
    counts.scatter_add_(1, tag_idx, torch.cat([used, used], dim=1).to(torch.int32))
    true = counts > 0  # (num, V)

    # Drop each true tag with probability drop_p; rescue one uniformly chosen true tag if none left.
    kept = true & (drop_u >= drop_p)
    empty = ~kept.any(dim=1)  # (num,)
    rescue = torch.where(true, keep_u, -1.0).argmax(dim=1)  # uniform among the true tags
    kept[empty, rescue[empty]] = True

    # Add one wrong tag with probability wrong_p, uniform among the non-true tags (there are
    # always some: at most 4 classes + 4 super-tags of the 14 are true).
    add_wrong = wrong_u < wrong_p
    wrong = torch.where(true, -1.0, wrong_pick_u).argmax(dim=1)
    kept[add_wrong, wrong[add_wrong]] = True

    tags = kept.to(torch.float32)
    if return_sources:
        return mosaics, tags, sources, full
    return mosaics, tags


def tag_targets(multi_hot: torch.Tensor) -> torch.Tensor:
    """The WSP soft target: each row of tags divided by its tag count, so rows sum to 1.

    Args:
        multi_hot: ``(N, V)`` 0/1 tags.

    Returns:
        float32 ``(N, V)``. A row without tags stays all-zero (no NaN) rather than summing to 1.
    """
    multi_hot = multi_hot.to(torch.float32)
    return multi_hot / multi_hot.sum(dim=-1, keepdim=True).clamp(min=1.0)


# How the tags read in a caption: the class tags as nouns with their article, the super-tags as words.
CAPTION_NOUNS: tuple[str, ...] = ("a t-shirt", "a pair of trousers", "a pullover", "a dress", "a coat", "a sandal",
                                  "a shirt", "a sneaker", "a bag", "an ankle boot")
CAPTION_SUPER_WORDS: tuple[str, ...] = ("a top", "footwear", "legwear or dresses", "an accessory")
CAPTION_TEMPLATES: tuple[str, ...] = ("a photo of {}.", "a picture of {}.", "{}, on a plain background.",
                                      "a small grey photo of {}.")


def _join(words: list[str]) -> str:
    return words[0] if len(words) == 1 else ", ".join(words[:-1]) + " and " + words[-1]


def make_captions(tags: torch.Tensor, seed: int) -> list[str]:
    """One caption per row of ``tags`` ((N, len(VOCAB)) multi-hot, e.g. :func:`make_weak_hashtags`'s),
    a pure function of (tags, seed); see the module docstring.

    Raises:
        DataError: ``tags`` is not (N, len(VOCAB)) or a row has no tag.
    """
    if tags.ndim != 2 or tags.shape[1] != len(VOCAB):
        raise DataError(f"make_captions needs (N, {len(VOCAB)}) multi-hot tags, got {tuple(tags.shape)}; pass the "
                        "tags make_weak_hashtags returns")
    on = tags > 0
    if not on.any(dim=1).all():
        raise DataError(f"make_captions: row {int((~on.any(dim=1)).nonzero()[0])} has no tag to caption")
    g = torch.Generator().manual_seed(int(seed))
    n, c = tags.shape[0], len(CLASS_TAGS)
    order = torch.rand(n, c, generator=g).argsort(dim=1)  # drawn for every row, used or not
    template = torch.randint(0, len(CAPTION_TEMPLATES), (n,), generator=g)
    out = []
    for i in range(n):
        items = [CAPTION_NOUNS[j] for j in order[i].tolist() if on[i, j]]
        supers = [CAPTION_SUPER_WORDS[j] for j in range(len(SUPER_TAGS)) if on[i, c + j]]
        text = ", ".join(([_join(items)] if items else []) + supers)
        out.append(CAPTION_TEMPLATES[int(template[i])].format(text))
    return out

