"""The training stages' sections: the optimizer fields they share, the crop and flip they share
(``augment``), and each stage's own (MAE, WSP, fine-tune, LiT)."""
from __future__ import annotations

import math
from dataclasses import dataclass

from maws_fast.config.fields import check, setting

ENCODERS = ("mae", "wsp", "wsp_scratch")  # this run's encoders a fine-tune or LiT can start from


@dataclass
class OptimConfig:
    epochs: float = setting(1.0, "passes over the stage's training set (fractions allowed)")
    batch_size: int = setting(256, "global batch size")
    blr: float = setting(1.5e-4, "base lr; the lr is blr * batch_size / 256 (MAE's rule)")
    lr: float | None = setting(None, "absolute lr; overrides blr when set")
    min_lr: float = setting(0.0, "lr at the end of the cosine")
    warmup_epochs: float = setting(0.1, "linear warmup length, in epochs")
    weight_decay: float = setting(0.05, "AdamW decoupled weight decay (not on 1-D params and biases)")
    beta1: float = setting(0.9, "AdamW beta1")
    beta2: float = setting(0.95, "AdamW beta2 (MAE uses 0.95)")
    clip_grad: float | None = setting(None, "max global grad norm; null disables clipping")

    def __post_init__(self):
        check(self.epochs > 0, "epochs", "must be > 0")
        check(self.batch_size >= 1, "batch_size", "must be >= 1")
        check(self.blr > 0, "blr", "must be > 0")
        check(self.lr is None or self.lr > 0, "lr", "must be > 0 or null")
        check(0 <= self.min_lr, "min_lr", "must be >= 0")
        check(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs", f"must be in [0, epochs={self.epochs}]")
        check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1", "betas must be in [0, 1)")
        check(self.clip_grad is None or self.clip_grad > 0, "clip_grad", "must be > 0 or null")

    @property
    def abs_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256


@dataclass
class Augment:
    """The crop and flip every training stage applies to its images (``<stage>.augment``): a
    RandomResizedCrop to the model's size, then a horizontal flip. Each stage has its own defaults.
    A fine-tune's RandAugment and random erasing stay in its own section (``finetune.rand_aug``,
    ``finetune.reprob``): no other stage runs them."""

    crop_scale: tuple[float, float] = setting((0.08, 1.0), "RandomResizedCrop area range")
    flip_p: float = setting(0.5, "horizontal flip probability")

    def __post_init__(self):
        check(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "crop_scale", "must satisfy 0 < lo <= hi <= 1")
        check(0 <= self.flip_p <= 1, "flip_p", "must be in [0, 1]")


def _compare(key: str, compare: list[str], init: str) -> None:
    bad = [c for c in compare if c not in ENCODERS or c == init]
    check(not bad, f"{key}.compare", f"{bad}: list other encoders of this run ({', '.join(ENCODERS)}), not "
          f"{key}.init itself")


@dataclass
class MAEConfig(OptimConfig):
    mask_ratio: float = setting(0.75, "fraction of patches removed")
    norm_pix_loss: bool = setting(True, "per-patch normalised pixel targets")
    augment: Augment = setting(lambda: Augment(crop_scale=(0.2, 1.0)),
                               "crop and flip of the training images (the official MAE: scale 0.2-1, flip 0.5)")

    def __post_init__(self):
        super().__post_init__()
        check(0 < self.mask_ratio < 1, "mae.mask_ratio", "must be in (0, 1)")


@dataclass
class WSPConfig(OptimConfig):
    blr: float = setting(1e-3, "base lr (per 256 images)")
    weight_decay: float = setting(0.1, "AdamW weight decay")
    beta2: float = setting(0.999, "AdamW beta2")
    init: str = setting("mae", "encoder init: mae (the mae stage's final weights) | scratch | PATH (a checkpoint "
                        "directory, .safetensors, or .pth/.pt/.bin: official MAE, MAWS, timm)")
    compare_scratch: bool = setting(
        True, "also train a from-scratch WSP model with the same budget (the demo's baseline)")
    num_samples: int = setting(60000, "weak-hashtag mosaics generated from the train split")
    drop_p: float = setting(0.3, "probability a true tag is dropped")
    wrong_p: float = setting(0.1, "probability a wrong tag is added")
    augment: Augment = setting(Augment, "crop and flip of the training images (scale 0.08-1, flip 0.5)")
    pos_embed: str = setting("learned", "position table: learned (starts as the MAE's sin-cos table and trains, without "
                             "weight decay, as in SWAG / MAWS's released encoders) | fixed (the sin-cos table frozen)")

    def __post_init__(self):
        super().__post_init__()
        check(self.pos_embed in ("learned", "fixed"), "wsp.pos_embed", f"{self.pos_embed!r}: use learned or fixed")
        check(self.num_samples >= 1, "wsp.num_samples", "must be >= 1")
        check(0 <= self.drop_p < 1 and 0 <= self.wrong_p <= 1, "wsp.drop_p", "probabilities must be in [0, 1)")


@dataclass
class FinetuneConfig(OptimConfig):
    """The official MAE fine-tune recipe (main_finetune.py), each piece on where it is on there."""

    blr: float = setting(1e-3, "base lr (per 256 images); the official B/16 recipe uses 5e-4, L and H 1e-3")
    min_lr: float = setting(1e-6, "lr at the end of the cosine")
    weight_decay: float = setting(0.05, "AdamW weight decay (not on 1-D params, pos_embed, cls_token)")
    beta2: float = setting(0.999, "AdamW beta2")
    init: str = setting("wsp", "encoder to fine-tune: mae | wsp | wsp_scratch (this run's final weights) | PATH "
                        "(a checkpoint directory, .safetensors, or .pth/.pt/.bin: official MAE, MAWS, timm)")
    compare: list[str] = setting(lambda: [], "more of this run's encoders fine-tuned alike, each its own stage "
                                 "finetune_<name> (the demo: [wsp_scratch, mae])")
    layer_decay: float = setting(0.75, "layer-wise lr decay: block i's lr scale is layer_decay ** (depth + 1 - (i + 1))")
    drop_path: float = setting(0.1, "stochastic depth of the last block (timm's linear rule over depth)")
    global_pool: str = setting("avg", "avg (mean of patch tokens + fc_norm, the official default) | token (cls + norm)")
    mixup: float = setting(0.8, "Mixup alpha (0 = off)")
    cutmix: float = setting(1.0, "CutMix alpha (0 = off)")
    mixup_prob: float = setting(1.0, "probability a batch is mixed")
    mixup_switch_prob: float = setting(0.5, "probability of CutMix instead of Mixup when both are on")
    smoothing: float = setting(0.1, "label smoothing, folded into the (mixed) soft targets")
    rand_aug: str = setting("rand-m9-mstd0.5-inc1", "RandAugment policy after the crop and flip (timm's rand-* "
                            "syntax; none = off)")
    reprob: float = setting(0.25, "random erasing probability on the normalised image ('pixel' mode, one box; 0 = off)")
    img_size: int = setting(0, "fine-tune resolution (0 = model.img_size); a checkpoint's learned pos-embed is resampled")
    augment: Augment = setting(Augment, "crop and flip of the training images (the official: scale 0.08-1, flip 0.5)")

    def __post_init__(self):
        super().__post_init__()
        check(0 < self.layer_decay <= 1, "finetune.layer_decay", "must be in (0, 1]")
        check(0 <= self.drop_path < 1, "finetune.drop_path", "must be in [0, 1)")
        check(self.global_pool in ("avg", "token"), "finetune.global_pool", f"{self.global_pool!r}: use avg or token")
        check(self.mixup >= 0 and self.cutmix >= 0, "finetune.mixup", "alphas must be >= 0")
        check(0 <= self.mixup_prob <= 1 and 0 <= self.mixup_switch_prob <= 1, "finetune.mixup_prob",
              "probabilities must be in [0, 1]")
        check(0 <= self.smoothing < 1, "finetune.smoothing", "must be in [0, 1)")
        check(self.img_size >= 0, "finetune.img_size", "must be >= 0 (0 = model.img_size)")
        check(self.rand_aug == "none" or self.rand_aug.startswith("rand"), "finetune.rand_aug",
              f"{self.rand_aug!r}: use a timm policy like rand-m9-mstd0.5-inc1, or none")
        check(0 <= self.reprob <= 1, "finetune.reprob", "must be in [0, 1]")
        _compare("finetune", self.compare, self.init)


@dataclass
class LiTConfig(OptimConfig):
    """Locked-image tuning (LiT): a text tower trained against a frozen image encoder, CLIP's loss."""

    blr: float = setting(1e-3, "base lr (per 256 pairs)")
    weight_decay: float = setting(0.1, "AdamW weight decay (not on 1-D params, biases, logit_scale)")
    beta2: float = setting(0.98, "AdamW beta2 (CLIP's)")
    warmup_epochs: float = setting(0.1, "linear warmup length, in epochs")
    init: str = setting("wsp", "the locked image tower: mae | wsp | wsp_scratch (this run's final weights) | PATH "
                        "(a checkpoint directory, .safetensors, or .pth/.pt/.bin of model's architecture)")
    compare: list[str] = setting(lambda: [], "more of this run's encoders given a text tower alike, each its own "
                                 "stage lit_<name> (the demo: [wsp_scratch])")
    num_samples: int = setting(0, "image-caption pairs trained on: the first N (0 = all); the demo's are its "
                               "weak-hashtag mosaics with captions made from their tags")
    embed_dim: int = setting(128, "shared width of the two towers' projections")
    width: int = setting(128, "text tower width")
    depth: int = setting(4, "text tower blocks")
    num_heads: int = setting(4, "text tower heads")
    mlp_ratio: float = setting(4.0, "text tower MLP hidden = mlp_ratio * width")
    context_length: int = setting(40, "caption tokens, [CLS] and [EOS] included (longer captions are truncated)")
    vocab_size: int = setting(1000, "BPE vocabulary trained on the captions (a smaller one is kept if the corpus "
                              "has fewer merges)")
    tokenizer: str | None = setting(None, "a tokenizer.json from `maws-data tokenizer`; null = train a BPE on the "
                                    "training captions (written to <out_dir>/<stage>/tokenizer.json either way)")
    augment: Augment = setting(lambda: Augment(crop_scale=(0.9, 1.0), flip_p=0.0),
                               "crop and flip of the JPEG loaders (the demo's in-memory data is not augmented: its "
                               "features are cached); flip 0: a caption may say left or right")
    init_logit_scale: float = setting(2.6592600369327779, "initial log of the logit scale: log(1 / 0.07), CLIP's; "
                                      "the scale is clamped at 100")

    def __post_init__(self):
        super().__post_init__()
        check(self.num_samples >= 0, "lit.num_samples", "must be >= 0 (0 = all)")
        for k in ("embed_dim", "width", "depth", "num_heads"):
            check(int(getattr(self, k)) >= 1, f"lit.{k}", "must be >= 1")
        check(self.width % self.num_heads == 0, "lit.width", f"{self.width} is not divisible by lit.num_heads="
              f"{self.num_heads}")
        check(self.mlp_ratio > 0, "lit.mlp_ratio", "must be > 0")
        check(self.context_length >= 3, "lit.context_length", "must be >= 3 ([CLS], a token, [EOS])")
        check(self.vocab_size >= 260, "lit.vocab_size", "must be >= 260 (256 bytes, 3 specials, 1 merge)")
        check(self.init_logit_scale <= math.log(100), "lit.init_logit_scale", "must be <= log(100), the clamp")
        _compare("lit", self.compare, self.init)
