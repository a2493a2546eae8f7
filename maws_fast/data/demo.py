"""The demo's data: Fashion-MNIST splits in memory plus the weak-hashtag mosaics made from them.

What a config's run needs of Fashion-MNIST (:mod:`maws_fast.data.fmnist` parses the files and
makes the hashtags): the train and test splits for MAE and the probes, and the WSP mosaics.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch

from maws_fast.config import Config
from maws_fast.data import fmnist
from maws_fast.errors import ConfigError


@dataclass
class DemoData:
    """Fashion-MNIST splits plus the weak-hashtag mosaics made from the train split."""

    train_x: torch.Tensor  # (N, 28, 28) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    wsp_x: torch.Tensor  # (M, 28, 28) uint8 mosaics
    wsp_tags: torch.Tensor  # (M, V) multi-hot


def load_data(cfg: Config) -> DemoData | None:
    """Load Fashion-MNIST and build the WSP hashtag set (deterministic in run.seed).

    None when no stage needs it: JPEG loaders train from data.train, and there is no linprobe.
    """
    jpeg = cfg.data.loader != "reference"
    if cfg.data.dataset != "fmnist" or (jpeg and "linprobe" not in cfg.run.stages):
        return None
    if cfg.model.img_size != 28 or cfg.model.in_chans != 1:
        raise ConfigError(
            f"config: model.img_size/in_chans: Fashion-MNIST is 28x28 grey; got {cfg.model.img_size}x"
            f"{cfg.model.img_size} with {cfg.model.in_chans} channels (use --model.preset=tiny)"
        )
    train_x, train_y = fmnist.load_fmnist(cfg.data.root, "train")
    test_x, test_y = fmnist.load_fmnist(cfg.data.root, "test")
    w = cfg.wsp
    if jpeg:  # only the eval splits are needed
        return DemoData(train_x, train_y, test_x, test_y, train_x[:0], torch.zeros(0, len(fmnist.VOCAB)))
    wsp_x, wsp_tags = fmnist.make_weak_hashtags(train_x, train_y, w.num_samples, seed=cfg.run.seed, drop_p=w.drop_p, wrong_p=w.wrong_p)
    return DemoData(train_x, train_y, test_x, test_y, wsp_x, wsp_tags)
