"""Configuration: a tree of dataclasses, YAML files, and ``--section.key=value`` overrides.

Every field carries its one-line help next to its definition (:func:`setting`; ``maws-train
--help-config`` lists them with type and default, :func:`config_help`) and is validated in
``__post_init__``; unknown keys, bad values and unreadable YAML raise
:class:`~maws_fast.errors.ConfigError` naming the key or the file position. Model presets are plain
functions.
"""
from __future__ import annotations

import dataclasses
import json
import math
import re
import types
import typing
from dataclasses import dataclass, field
from pathlib import Path

from maws_fast.errors import ConfigError

# Names the config accepts; the code that implements them checks against these (config imports
# neither torch nor the models, so reading a config is cheap).
ATTN_BACKENDS = ("triton", "sdpa", "xformers", "manual")  # maws_fast.models.attention implements each


def _check(cond: bool, key: str, msg: str) -> None:
    if not cond:
        raise ConfigError(f"config: {key}: {msg}")


def setting(default, help: str):
    """A config field with its one-line help. A mutable default (a list, a section) is given as a
    zero-argument function (``lambda: [5]``, ``RunConfig``), as dataclasses require."""
    if callable(default):
        return field(default_factory=default, metadata={"help": help})
    return field(default=default, metadata={"help": help})


# --- model -----------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    preset: str = setting("tiny", "name the other fields were filled from (informational once resolved)")
    img_size: int = setting(28, "input side in pixels")
    patch_size: int = setting(4, "patch side p")
    in_chans: int = setting(1, "image channels")
    embed_dim: int = setting(128, "encoder width D")
    depth: int = setting(4, "encoder blocks")
    num_heads: int = setting(4, "encoder heads")
    mlp_ratio: float = setting(4.0, "MLP hidden = mlp_ratio * width (encoder and decoder)")
    decoder_embed_dim: int = setting(64, "MAE decoder width")
    decoder_depth: int = setting(2, "MAE decoder blocks")
    decoder_num_heads: int = setting(4, "MAE decoder heads")
    attn_backend: str = setting("sdpa", "attention backend: triton | sdpa | xformers (GPU) | manual")
    kernel_backend: str | None = setting(
        None, "maws_kernels backend: triton | cuda (csrc twins of patch gather + loss) | torch | null (best available)")

    def __post_init__(self):
        for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                  "decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
            _check(int(getattr(self, k)) >= 1, f"model.{k}", "must be >= 1")
        _check(self.img_size % self.patch_size == 0, "model.img_size",
               f"{self.img_size} is not divisible by model.patch_size={self.patch_size}")
        _check(self.embed_dim % self.num_heads == 0, "model.embed_dim",
               f"{self.embed_dim} is not divisible by model.num_heads={self.num_heads}")
        _check(self.decoder_embed_dim % self.decoder_num_heads == 0, "model.decoder_embed_dim",
               f"{self.decoder_embed_dim} is not divisible by model.decoder_num_heads={self.decoder_num_heads}")
        _check(self.embed_dim % 4 == 0 and self.decoder_embed_dim % 4 == 0, "model.embed_dim",
               "widths must be divisible by 4 for the 2D sin-cos position embedding")
        _check(self.mlp_ratio > 0, "model.mlp_ratio", "must be > 0")
        _check(self.attn_backend in ATTN_BACKENDS, "model.attn_backend",
               f"{self.attn_backend!r} is not one of {ATTN_BACKENDS}")
        if self.kernel_backend is not None:
            # maws_kernels owns its backend names; imported only when one is named (it imports torch)
            from maws_kernels import BACKENDS

            _check(self.kernel_backend in BACKENDS, "model.kernel_backend",
                   f"{self.kernel_backend!r} is not one of {', '.join(BACKENDS)} or null")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


def _zoo(embed_dim, depth, num_heads, patch_size, img_size=224) -> dict:
    # Every MAE / MAWS model pairs its encoder with the same 512-wide, 8-block, 16-head decoder.
    return dict(img_size=img_size, patch_size=patch_size, in_chans=3, embed_dim=embed_dim, depth=depth,
                num_heads=num_heads, mlp_ratio=4.0, decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16)


def preset_tiny() -> dict:
    """Fashion-MNIST demo / test model: 28x28 grey images, 4x4 patches (49 tokens), width 128."""
    return dict(img_size=28, patch_size=4, in_chans=1, embed_dim=128, depth=4, num_heads=4, mlp_ratio=4.0,
                decoder_embed_dim=64, decoder_depth=2, decoder_num_heads=4)


def preset_vit_b16() -> dict:
    """ViT-B/16: 768 wide, 12 blocks, 12 heads (86M encoder params)."""
    return _zoo(768, 12, 12, 16)


def preset_vit_l16() -> dict:
    """ViT-L/16: 1024 wide, 24 blocks, 16 heads (304M)."""
    return _zoo(1024, 24, 16, 16)


def preset_vit_h14() -> dict:
    """ViT-H/14: 1280 wide, 32 blocks, 16 heads (632M)."""
    return _zoo(1280, 32, 16, 14)


def preset_vit_2b14() -> dict:
    """ViT-2B/14: 2560 wide, 24 blocks, 32 heads, MLP 10240 (1.9B)."""
    return _zoo(2560, 24, 32, 14)


def preset_vit_6_5b14() -> dict:
    """ViT-6.5B/14: 4096 wide, 32 blocks, 32 heads, MLP 16384 (6.4B)."""
    return _zoo(4096, 32, 32, 14)


PRESETS = {
    "tiny": preset_tiny,
    "vit_b16": preset_vit_b16,
    "vit_l16": preset_vit_l16,
    "vit_h14": preset_vit_h14,
    "vit_2b14": preset_vit_2b14,
    "vit_6.5b14": preset_vit_6_5b14,
}


def model_preset(name: str, **overrides) -> ModelConfig:
    """A ModelConfig filled from preset ``name``, then ``overrides``."""
    _check(name in PRESETS, "model.preset", f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")
    return ModelConfig(preset=name, **{**PRESETS[name](), **overrides})


# --- stages ----------------------------------------------------------------------------------
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
        _check(self.epochs > 0, "epochs", "must be > 0")
        _check(self.batch_size >= 1, "batch_size", "must be >= 1")
        _check(self.blr > 0, "blr", "must be > 0")
        _check(self.lr is None or self.lr > 0, "lr", "must be > 0 or null")
        _check(0 <= self.min_lr, "min_lr", "must be >= 0")
        _check(0 <= self.warmup_epochs <= self.epochs, "warmup_epochs", f"must be in [0, epochs={self.epochs}]")
        _check(self.weight_decay >= 0, "weight_decay", "must be >= 0")
        _check(0 <= self.beta1 < 1 and 0 <= self.beta2 < 1, "beta1", "betas must be in [0, 1)")
        _check(self.clip_grad is None or self.clip_grad > 0, "clip_grad", "must be > 0 or null")

    @property
    def abs_lr(self) -> float:
        return self.lr if self.lr is not None else self.blr * self.batch_size / 256


@dataclass
class MAEConfig(OptimConfig):
    mask_ratio: float = setting(0.75, "fraction of patches removed")
    norm_pix_loss: bool = setting(True, "per-patch normalised pixel targets")
    crop_scale: tuple[float, float] = setting((0.2, 1.0), "RandomResizedCrop area range")
    flip_p: float = setting(0.5, "horizontal flip probability")

    def __post_init__(self):
        super().__post_init__()
        _check(0 < self.mask_ratio < 1, "mae.mask_ratio", "must be in (0, 1)")
        _check(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "mae.crop_scale", "must satisfy 0 < lo <= hi <= 1")
        _check(0 <= self.flip_p <= 1, "mae.flip_p", "must be in [0, 1]")


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
    crop_scale: tuple[float, float] = setting((0.08, 1.0), "RandomResizedCrop area range")
    flip_p: float = setting(0.5, "horizontal flip probability")

    def __post_init__(self):
        super().__post_init__()
        _check(self.num_samples >= 1, "wsp.num_samples", "must be >= 1")
        _check(0 <= self.drop_p < 1 and 0 <= self.wrong_p <= 1, "wsp.drop_p", "probabilities must be in [0, 1)")
        _check(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "wsp.crop_scale", "must satisfy 0 < lo <= hi <= 1")


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
    crop_scale: tuple[float, float] = setting((0.08, 1.0), "RandomResizedCrop area range")
    flip_p: float = setting(0.5, "horizontal flip probability")

    def __post_init__(self):
        super().__post_init__()
        _check(0 < self.layer_decay <= 1, "finetune.layer_decay", "must be in (0, 1]")
        _check(0 <= self.drop_path < 1, "finetune.drop_path", "must be in [0, 1)")
        _check(self.global_pool in ("avg", "token"), "finetune.global_pool", f"{self.global_pool!r}: use avg or token")
        _check(self.mixup >= 0 and self.cutmix >= 0, "finetune.mixup", "alphas must be >= 0")
        _check(0 <= self.mixup_prob <= 1 and 0 <= self.mixup_switch_prob <= 1, "finetune.mixup_prob",
               "probabilities must be in [0, 1]")
        _check(0 <= self.smoothing < 1, "finetune.smoothing", "must be in [0, 1)")
        _check(self.img_size >= 0, "finetune.img_size", "must be >= 0 (0 = model.img_size)")
        _check(self.rand_aug == "none" or self.rand_aug.startswith("rand"), "finetune.rand_aug",
               f"{self.rand_aug!r}: use a timm policy like rand-m9-mstd0.5-inc1, or none")
        _check(0 <= self.reprob <= 1, "finetune.reprob", "must be in [0, 1]")
        _check(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "finetune.crop_scale", "must satisfy 0 < lo <= hi <= 1")
        _check(0 <= self.flip_p <= 1, "finetune.flip_p", "must be in [0, 1]")
        bad = [c for c in self.compare if c not in ("mae", "wsp", "wsp_scratch") or c == self.init]
        _check(not bad, "finetune.compare", f"{bad}: list other encoders of this run (mae, wsp, wsp_scratch), "
               "not finetune.init itself")


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
    crop_scale: tuple[float, float] = setting((0.9, 1.0), "RandomResizedCrop area range of the JPEG loaders (the "
                                              "demo's in-memory data is not augmented: its features are cached)")
    flip_p: float = setting(0.0, "horizontal flip probability of the JPEG loaders (0: a caption may say left or right)")
    init_logit_scale: float = setting(2.6592600369327779, "initial log of the logit scale: log(1 / 0.07), CLIP's; "
                                      "the scale is clamped at 100")

    def __post_init__(self):
        super().__post_init__()
        _check(self.num_samples >= 0, "lit.num_samples", "must be >= 0 (0 = all)")
        for k in ("embed_dim", "width", "depth", "num_heads"):
            _check(int(getattr(self, k)) >= 1, f"lit.{k}", "must be >= 1")
        _check(self.width % self.num_heads == 0, "lit.width", f"{self.width} is not divisible by lit.num_heads="
               f"{self.num_heads}")
        _check(self.mlp_ratio > 0, "lit.mlp_ratio", "must be > 0")
        _check(self.context_length >= 3, "lit.context_length", "must be >= 3 ([CLS], a token, [EOS])")
        _check(self.vocab_size >= 260, "lit.vocab_size", "must be >= 260 (256 bytes, 3 specials, 1 merge)")
        _check(self.init_logit_scale <= math.log(100), "lit.init_logit_scale", "must be <= log(100), the clamp")
        _check(0 < self.crop_scale[0] <= self.crop_scale[1] <= 1, "lit.crop_scale", "must satisfy 0 < lo <= hi <= 1")
        _check(0 <= self.flip_p <= 1, "lit.flip_p", "must be in [0, 1]")
        bad = [c for c in self.compare if c not in ("mae", "wsp", "wsp_scratch") or c == self.init]
        _check(not bad, "lit.compare", f"{bad}: list other encoders of this run (mae, wsp, wsp_scratch), not "
               "lit.init itself")


@dataclass
class EvalConfig:
    train_subset: int = setting(
        10000, "Fashion-MNIST train images whose frozen features fit the probe (0 = all; JPEG eval uses all)")
    probe_epochs: int = setting(30, "linear-probe epochs over the cached features")
    probe_lr: float = setting(0.1, "linear-probe base lr")
    probe_batch_size: int = setting(256, "linear-probe batch size")
    probe_optimizer: str = setting("sgd", "linear-probe optimizer: sgd (momentum 0.9) | lars (the official MAE probe's: "
                                   "momentum 0.9, trust 0.001, no rescale or decay of 1-D params)")
    probe_warmup_epochs: float = setting(0.0, "linear-probe lr warmup before the cosine (official: 10 of 90)")
    init: str | None = setting(None, "probe this checkpoint instead of the run's encoders: a checkpoint directory, "
                               ".safetensors or .pth/.pt/.bin (official MAE, MAWS, timm); null = this run's")
    clip: str | None = setting(None, "evaluate this MAWS CLIP checkpoint (vit_*_xlmr_*.pt: ViT + XLM-R) instead of the "
                               "run's encoders: zero-shot on data.eval_val's classes, and the probes of its image "
                               "tower; needs the [xlmr] extra")
    clip_tokenizer: str = setting("xlm-roberta-base", "eval.clip's XLM-R tokenizer: a local HF tokenizer directory, or a "
                                  "hub name (downloaded once by transformers)")
    shots: list[int] = setting(lambda: [5], "k for k-shot evaluation")
    fewshot_trials: int = setting(5, "random support sets per k")
    batch_size: int = setting(512, "feature-extraction batch size")

    def __post_init__(self):
        _check(self.train_subset >= 0, "eval.train_subset", "must be >= 0")
        _check(self.probe_epochs >= 1 and self.probe_lr > 0, "eval.probe_epochs", "epochs >= 1 and lr > 0")
        _check(all(int(k) >= 1 for k in self.shots), "eval.shots", "every k must be >= 1")
        _check(self.fewshot_trials >= 1, "eval.fewshot_trials", "must be >= 1")
        _check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        _check(self.probe_batch_size >= 2, "eval.probe_batch_size", "must be >= 2 (the probe's BatchNorm needs 2)")
        _check(self.probe_optimizer in ("sgd", "lars"), "eval.probe_optimizer", f"{self.probe_optimizer!r}: use sgd or lars")
        _check(0 <= self.probe_warmup_epochs < self.probe_epochs, "eval.probe_warmup_epochs",
               f"must be in [0, probe_epochs={self.probe_epochs})")
        _check(self.clip is None or self.init is None, "eval.clip", "set eval.clip or eval.init, not both")


LOADERS = ("reference", "pil", "dali")
FORMATS = ("webdataset", "folder", "filelist")


@dataclass
class DataConfig:
    dataset: str = setting(
        "fmnist", "fmnist (the demo: eval data, and training data for loader=reference) | jpeg (data.train)")
    root: str | None = setting(None, "Fashion-MNIST directory; null = /usr/share/datasets/fashion-mnist")
    loader: str = setting(
        "reference", "reference (in-memory Fashion-MNIST) | pil (PIL/DataLoader JPEG) | dali (NVIDIA DALI)")
    format: str = setting("webdataset", "JPEG source of the pil / dali loaders: webdataset | folder | filelist")
    train: str | None = setting(
        None, "MAE (and WSP) training data for pil / dali: shard dir, image folder or file list")
    wsp_train: str | None = setting(None, "WSP training data if not data.train (e.g. hashtag shards)")
    eval_train: str | None = setting(
        None, "dataset=jpeg: labelled images the linear probe / k-shot fit on (folder or shards)")
    eval_val: str | None = setting(None, "dataset=jpeg: labelled images they are scored on")
    eval_crop_frac: float = setting(
        0.875, "eval transform: resize the shorter side to img_size / crop_frac, centre crop")
    tags: str | None = setting(None, "hashtag JSONL of a file list ({\"file\": ..., \"tags\": [...]})")
    captions: str | None = setting(None, "caption JSONL of a file list ({\"file\": ..., \"caption\": \"...\"}; LiT)")
    lit_train: str | None = setting(None, "LiT training data if not data.train: captioned shards, or a file list with "
                                    "data.captions")
    vocab: str | None = setting(None, "hashtag vocabulary (vocab.json); shards name theirs in their manifest")
    num_workers: int = setting(0, "DataLoader worker processes (reference / pil; 0 = load in the training process)")
    max_bad_samples: int = setting(100, "distinct corrupt images tolerated (each logged by name) before the run stops")
    max_tags: int = setting(0, "pad width of WSP tag ids (0 = the longest list in the batch)")
    dali_threads: int = setting(4, "DALI CPU threads per pipeline")
    hw_decoder_load: float = setting(0.65, "share of JPEGs decoded by the GPU's hardware JPEG decoder (mixed decode)")
    device_memory_padding: int = setting(16777216, "nvJPEG device buffer over-allocation (bytes)")
    host_memory_padding: int = setting(8388608, "nvJPEG pinned host buffer over-allocation (bytes)")
    preallocate_width_hint: int = setting(0, "nvJPEG preallocation: expected max width (0 = none)")
    preallocate_height_hint: int = setting(0, "nvJPEG preallocation: expected max height (0 = none)")
    shuffle_buffer: int = setting(4096, "DALI reader shuffle buffer, samples (shards are shuffled when written)")
    dali_output: str = setting(
        "float32", "float32 (normalised by DALI) | uint8 (normalised on the device after the copy)")
    mean: list[float] = setting(lambda: [0.2860], "per-channel mean of [0,1] pixels")
    std: list[float] = setting(lambda: [0.3530], "per-channel std of [0,1] pixels")

    def __post_init__(self):
        _check(self.dataset in ("fmnist", "jpeg"), "data.dataset", f"{self.dataset!r}: use fmnist or jpeg")
        _check(self.loader in LOADERS, "data.loader", f"{self.loader!r}: choose from {LOADERS}")
        _check(self.format in FORMATS, "data.format", f"{self.format!r}: choose from {FORMATS}")
        _check(self.loader == "reference" or self.train is not None, "data.train",
               f"data.loader={self.loader} reads JPEGs: set --data.train=PATH (shards from `maws-data shards`, "
               "an image folder or a file list)")
        _check(self.loader != "reference" or self.dataset == "fmnist", "data.loader",
               "the reference loader holds Fashion-MNIST in memory; JPEG data needs --data.loader=pil or dali")
        _check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        _check(self.max_bad_samples >= 0 and self.max_tags >= 0, "data.max_bad_samples", "must be >= 0")
        _check(self.dali_threads >= 1 and self.shuffle_buffer >= 1, "data.dali_threads", "threads and shuffle_buffer >= 1")
        _check(0 < self.eval_crop_frac <= 1, "data.eval_crop_frac", "must be in (0, 1]")
        _check(0 <= self.hw_decoder_load <= 1, "data.hw_decoder_load", "must be in [0, 1]")
        _check(self.dali_output in ("float32", "uint8"), "data.dali_output", f"{self.dali_output!r}: use float32 or uint8")
        _check(len(self.mean) == len(self.std) and all(s > 0 for s in self.std), "data.std",
               "mean and std need one value per channel and std > 0")


PARALLEL_ENGINES = ("ours", "fsdp2", "ddp")  # maws_fast.parallel.engine.parallelize builds each


@dataclass
class ParallelConfig:
    engine: str = setting("ours", "ours (ZeRO + TP on our collectives) | fsdp2 (torch fully_shard) | ddp (torch DDP)")
    zero_stage: int | None = setting(
        None, "engine=ours: 0 replicate all | 1 shard optimizer | 2 + gradients | 3 + parameters | "
        "null = auto: 0 when the data-parallel world is 1 (nothing to shard), else 2")
    tp: int = setting(1, "tensor-parallel degree (engine=ours); the data-parallel degree is world / tp")
    bucket_mb: float = setting(25.0, "gradient bucket size in MiB (ours stages 0-2, ddp)")
    prefetch: bool = setting(True, "stage 3: all-gather the next block while the current one runs")
    param_dtype: str = setting(
        "auto", "model weights: fp32 | bf16 (bf16 copy, fp32 master + AdamW state; ours / fsdp2) | "
        "auto = bf16 when run.precision resolves to bf16 and the engine is ours or fsdp2, else fp32")
    grad_accum: int = setting(1, "micro-batches per optimizer step (no communication until the last)")
    backend: str = setting("auto", "process-group backend: auto (nccl on cuda, else gloo) | gloo | nccl")
    timeout_s: float = setting(1800.0, "seconds a collective may wait for a missing rank before it fails")
    stall_timeout_s: float = setting(
        300.0, "the heartbeat watchdog ends the job, naming the rank, when a rank's process has not beaten for this "
        "many seconds (SIGSTOP, a frozen host); 0 = off. Under torchrun only")

    def __post_init__(self):
        _check(self.engine in PARALLEL_ENGINES, "parallel.engine", f"{self.engine!r}: choose from {PARALLEL_ENGINES}")
        _check(self.zero_stage in (None, 0, 1, 2, 3), "parallel.zero_stage", f"{self.zero_stage}: use 0, 1, 2, 3 or null (auto)")
        _check(self.tp >= 1, "parallel.tp", "must be >= 1")
        _check(self.engine == "ours" or self.tp == 1, "parallel.tp",
               f"tensor parallel runs with engine=ours; engine={self.engine} is data parallel only (set --parallel.tp=1)")
        _check(self.bucket_mb > 0, "parallel.bucket_mb", "must be > 0")
        _check(self.param_dtype in ("auto", "fp32", "bf16"), "parallel.param_dtype",
               f"{self.param_dtype!r}: use auto, fp32 or bf16")
        _check(self.engine != "ddp" or self.param_dtype in ("auto", "fp32"), "parallel.param_dtype",
               "ddp keeps fp32 weights; use engine=ours or fsdp2 for a bf16 model copy (or run.precision=bf16)")
        _check(self.grad_accum >= 1, "parallel.grad_accum", "must be >= 1")
        _check(self.timeout_s > 0, "parallel.timeout_s", "must be > 0 seconds")
        _check(self.stall_timeout_s >= 0, "parallel.stall_timeout_s", "must be >= 0 seconds (0 = off)")
        _check(self.backend in ("auto", "gloo", "nccl"), "parallel.backend", f"{self.backend!r}: use auto, gloo or nccl")


STAGES = ("mae", "wsp", "finetune", "lit", "linprobe")
DEFAULT_STAGES = ("mae", "wsp", "finetune", "linprobe")
CHECKPOINT_MODES = ("none", "full", "selective")  # maws_fast.models.vit.set_block_options implements each


@dataclass
class RunConfig:
    out_dir: str = setting("runs/demo", "where checkpoints, metrics and results go")
    seed: int = setting(0, "seeds every RNG (data order, augmentation, masking, init)")
    device: str = setting("cpu", "cpu | cuda | cuda:N")
    threads: int = setting(0, "torch intra-op threads (0 = torch's default)")
    stages: list[str] = setting(lambda: list(DEFAULT_STAGES), "stages to run, in order (lit is opt-in)")
    ckpt_every: int = setting(200, "steps between checkpoints (the end of a stage always writes one)")
    log_every: int = setting(20, "steps between metric lines (the CPU waits for the loss only here)")
    progress: bool = setting(True, "tqdm progress bar")
    precision: str = setting(
        "auto", "compute dtype: fp32 | bf16 (bf16 activations; weights per parallel.param_dtype, fp32 master and "
        "AdamW state) | auto = bf16 on cuda, fp32 on cpu")
    tf32: bool = setting(True, "cuda: TF32 tensor cores for whatever matmuls and convolutions stay fp32")
    compile: bool = setting(
        False, "regional torch.compile: each transformer block's body compiled on its own (fullgraph), the engines' "
        "hooks left eager around it; dynamo's caches scoped to each stage (its graph count printed at its end); "
        "the first steps pay the compile; MAWS_COMPILE_BACKEND names another dynamo backend (default inductor)")
    activation_checkpoint: str = setting(
        "none", "per block: none | full (keep only the block's input, recompute its forward in backward) | "
        "selective (also keep the qkv and fc1 GEMM outputs; recompute norms, attention, GELU, the attention "
        "projection)")
    tensorboard: bool = setting(False, "also write every metrics row to TensorBoard under <out_dir>/<stage>/tb "
                                "(needs the tensorboard package)")

    def __post_init__(self):
        _check(len(self.stages) > 0, "run.stages", f"is empty; choose from {STAGES}")
        bad = [s for s in self.stages if s not in STAGES]
        _check(not bad, "run.stages", f"unknown stage(s) {bad}; choose from {STAGES}")
        _check(self.ckpt_every >= 1 and self.log_every >= 1, "run.ckpt_every", "intervals must be >= 1")
        _check(re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None, "run.device", f"{self.device!r}: use cpu or cuda[:N]")
        _check(self.threads >= 0, "run.threads", "must be >= 0 (0 = torch's default)")
        _check(self.precision in ("auto", "fp32", "bf16"), "run.precision", f"{self.precision!r}: use auto, fp32 or bf16")
        _check(self.activation_checkpoint in CHECKPOINT_MODES, "run.activation_checkpoint",
               f"{self.activation_checkpoint!r}: use one of {CHECKPOINT_MODES}")


@dataclass
class Config:
    run: RunConfig = setting(RunConfig, "where and what to run")
    data: DataConfig = setting(DataConfig, "dataset and loader")
    model: ModelConfig = setting(ModelConfig, "architecture (model.preset fills the other fields first; defaults: tiny)")
    mae: MAEConfig = setting(MAEConfig, "MAE pre-pretraining")
    wsp: WSPConfig = setting(WSPConfig, "weakly supervised pretraining")
    finetune: FinetuneConfig = setting(FinetuneConfig, "fine-tuning on labelled data (the official MAE recipe)")
    lit: LiTConfig = setting(LiTConfig, "locked-image text tower (LiT) for zero-shot transfer")
    eval: EvalConfig = setting(EvalConfig, "linear probe and few-shot")
    parallel: ParallelConfig = setting(ParallelConfig, "engine, ZeRO stage, tensor parallel")

    def __post_init__(self):
        _check(len(self.data.mean) == self.model.in_chans, "data.mean",
               f"has {len(self.data.mean)} values but model.in_chans is {self.model.in_chans}")
        par = self.parallel
        shards_params = (par.engine == "ours" and par.zero_stage == 3) or par.engine == "fsdp2"
        _check(not (self.run.precision == "bf16" and shards_params and par.param_dtype == "fp32"), "parallel.param_dtype",
               "run.precision=bf16 with sharded parameters (zero_stage=3 or fsdp2) and fp32 weights: autocast keeps a "
               "bf16 copy of every weight from forward to backward, undoing the sharding; set --parallel.param_dtype=bf16")
        tp, m = self.parallel.tp, self.model
        hidden = int(m.embed_dim * m.mlp_ratio), int(m.decoder_embed_dim * m.mlp_ratio)
        _check(all(n % tp == 0 for n in (m.num_heads, m.decoder_num_heads, *hidden)), "parallel.tp",
               f"{tp} must divide the encoder and decoder head counts ({m.num_heads}, {m.decoder_num_heads}) and MLP "
               f"widths {hidden}; choose a divisor of them")
        L = self.model.num_patches
        _check(int(L * (1 - self.mae.mask_ratio)) >= 1, "mae.mask_ratio",
               f"{self.mae.mask_ratio} keeps no patch of {L}; lower it")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


# --- defaults that depend on the device and the world size -----------------------------------
def resolve_run(run: RunConfig) -> RunConfig:
    """``run`` with ``precision="auto"`` made concrete: bf16 on cuda, fp32 on cpu (exact tests and demo)."""
    if run.precision != "auto":
        return run
    return dataclasses.replace(run, precision="bf16" if run.device.startswith("cuda") else "fp32")


def resolve_parallel(par: ParallelConfig, precision: str, dp_world: int) -> ParallelConfig:
    """``par`` with its automatic fields made concrete for a run of ``precision`` (resolved) on a
    data-parallel world of ``dp_world``: ZeRO stage 0 when there is nothing to shard, else 2; bf16
    weights (fp32 master and AdamW state in the engine) with bf16 compute unless DDP keeps fp32."""
    out = par
    if par.zero_stage is None:
        out = dataclasses.replace(out, zero_stage=0 if dp_world == 1 else 2)
    if par.param_dtype == "auto":
        bf16 = precision == "bf16" and par.engine != "ddp"
        out = dataclasses.replace(out, param_dtype="bf16" if bf16 else "fp32")
    return out


def resolve_defaults(cfg: Config, dp_world: int) -> tuple[Config, list[str]]:
    """The config with every automatic default made concrete, and one line per default chosen.

    Called once at start (after the process group is up, so the data-parallel world is known);
    the lines are printed, and the resolved config is what ``config.json`` and checkpoints record.
    """
    run = resolve_run(cfg.run)
    par = resolve_parallel(cfg.parallel, run.precision, dp_world)
    lines = []
    if cfg.run.precision == "auto":
        lines.append(f"run.precision={run.precision} (auto for {run.device})")
    if cfg.parallel.param_dtype == "auto":
        why = "ddp keeps fp32 weights" if par.engine == "ddp" and run.precision == "bf16" else f"run.precision={run.precision}"
        lines.append(f"parallel.param_dtype={par.param_dtype} (auto: {why}; master weights and AdamW state fp32)")
    if cfg.parallel.zero_stage is None and par.engine == "ours":
        lines.append(f"parallel.zero_stage={par.zero_stage} (auto: data-parallel world {dp_world})")
    if run.device.startswith("cuda"):
        lines.append(f"run.tf32={'on' if run.tf32 else 'off'} (fp32 matmuls and convolutions); host batches pinned, "
                     "copied with non_blocking")
    return dataclasses.replace(cfg, run=run, parallel=par), lines


# --- building from dicts, YAML and overrides -----------------------------------------------
@dataclasses.dataclass(frozen=True)
class CliText:
    """An override value from the command line: the raw text and its YAML reading.

    String fields take the raw text (``--run.out_dir=0.10`` stays "0.10", not "0.1"); every
    other field takes the YAML reading (numbers, booleans, lists, null).
    """

    raw: str
    parsed: object


def _coerce(value, tp, key: str):
    """Convert a YAML / CLI value to the field's annotated type, or raise naming the key."""
    origin = typing.get_origin(tp)
    args = typing.get_args(tp)
    if isinstance(value, CliText):
        options = [a for a in args if a is not type(None)] if origin in (typing.Union, types.UnionType) else [tp]
        if str in options and not (value.parsed is None and type(None) in args):
            return value.raw
        value = value.parsed
    if origin in (typing.Union, types.UnionType):
        if value is None and type(None) in args:
            return None
        inner = [a for a in args if a is not type(None)]
        return _coerce(value, inner[0], key)
    if tp is bool:
        if isinstance(value, bool):
            return value
        if isinstance(value, str) and value.lower() in ("true", "false", "1", "0", "yes", "no"):
            return value.lower() in ("true", "1", "yes")
        raise ConfigError(f"config: {key}: expected true/false, got {value!r}")
    if tp in (int, float):
        if isinstance(value, bool):
            raise ConfigError(f"config: {key}: expected a number, got {value!r}")
        try:
            out = tp(value) if not (tp is int and isinstance(value, float)) else None
        except (TypeError, ValueError):
            out = None
        if tp is int and isinstance(value, str):
            try:
                out = int(value)
            except ValueError:
                out = None
        if out is None or (tp is float and not math.isfinite(out)):
            raise ConfigError(f"config: {key}: expected {tp.__name__}, got {value!r}")
        return out
    if tp is str:
        if not isinstance(value, (str, int, float)) or isinstance(value, bool):
            raise ConfigError(f"config: {key}: expected a string, got {value!r}")
        return str(value)
    if origin in (list, tuple):
        if isinstance(value, str):
            value = [v for v in value.strip("[]()").split(",") if v.strip()]
        elif isinstance(value, (int, float)) and not isinstance(value, bool) and origin is list:
            value = [value]  # --eval.shots=5 means [5]
        if not isinstance(value, (list, tuple)):
            raise ConfigError(f"config: {key}: expected a list, got {value!r}")
        if origin is tuple:
            if len(args) != len(value):
                raise ConfigError(f"config: {key}: expected {len(args)} values, got {value!r}")
            return tuple(_coerce(v, a, key) for v, a in zip(value, args))
        return [_coerce(v.strip() if isinstance(v, str) else v, args[0], key) for v in value]
    return value


def _build(cls, data: dict, prefix: str):
    if not isinstance(data, dict):
        raise ConfigError(f"config: {prefix.rstrip('.') or 'top level'}: expected a mapping, got {data!r}")
    hints = typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}
    unknown = sorted(set(data) - names)
    if unknown:
        raise ConfigError(
            f"config: unknown key {prefix}{unknown[0]}" + (f" (and {unknown[1:]})" if unknown[1:] else "")
            + f"; valid keys under {prefix.rstrip('.') or 'the top level'}: {sorted(names)} "
            + f"(`maws-train --help-config{' ' + prefix.split('.')[0] if prefix else ''}` explains each)"
        )
    kwargs = {}
    for name, value in data.items():
        tp = hints[name]
        if dataclasses.is_dataclass(tp):
            kwargs[name] = _build(tp, value, f"{prefix}{name}.")
        else:
            kwargs[name] = _coerce(value, tp, f"{prefix}{name}")
    try:
        return cls(**kwargs)
    except ConfigError as e:
        msg = str(e)
        if prefix and msg.startswith("config: ") and not msg.startswith(f"config: {prefix}"):
            sub = msg[len("config: "):]
            if not any(sub.startswith(f"{s}.") for s in ("model", "mae", "wsp", "eval", "data", "run", "parallel")):
                msg = f"config: {prefix}{sub}"
        raise ConfigError(msg) from None


def config_from_dict(data: dict) -> Config:
    """Build and validate a Config. ``model.preset`` fills the model fields first."""
    data = {k: (dict(v) if isinstance(v, dict) else v) for k, v in (data or {}).items()}
    model = data.get("model", {})
    if isinstance(model, dict):
        preset = model.get("preset", "tiny")
        preset = preset.raw if isinstance(preset, CliText) else preset
        _check(isinstance(preset, str) and preset in PRESETS, "model.preset",
               f"unknown preset {preset!r}; choose one of {sorted(PRESETS)}")
        data["model"] = {**PRESETS[preset](), **model, "preset": preset}
    return _build(Config, data, "")


def parse_overrides(args: list[str]) -> dict:
    """``["--mae.epochs=2", "--run.stages", "mae,wsp"]`` -> nested dict (values parsed as YAML)."""
    import yaml

    out: dict = {}
    i = 0
    while i < len(args):
        arg = args[i]
        if not arg.startswith("--") or len(arg) <= 2:
            raise ConfigError(f"config: cannot parse argument {arg!r}; overrides look like --section.key=value")
        key, eq, value = arg[2:].partition("=")
        if not eq:
            if i + 1 >= len(args) or args[i + 1].startswith("--"):
                raise ConfigError(f"config: override --{key} has no value; write --{key}=VALUE")
            value = args[i + 1]
            i += 1
        if "." not in key:
            raise ConfigError(f"config: override --{key} must name a section and key, e.g. --mae.epochs=2")
        try:
            parsed = yaml.safe_load(value) if value != "" else ""
        except yaml.YAMLError:
            parsed = value
        parsed = CliText(value, parsed)
        node = out
        parts = key.split(".")
        for p in parts[:-1]:
            node = node.setdefault(p, {})
            if not isinstance(node, dict):
                raise ConfigError(f"config: override --{key} conflicts with an earlier override")
        node[parts[-1]] = parsed
        i += 1
    return out


def _merge(base: dict, over: dict) -> dict:
    out = dict(base)
    for k, v in over.items():
        out[k] = _merge(out[k], v) if isinstance(v, dict) and isinstance(out.get(k), dict) else v
    return out


def _type_name(tp) -> str:
    """How --help-config spells a field's type (YAML words: null, lists)."""
    origin, args = typing.get_origin(tp), typing.get_args(tp)
    if origin in (typing.Union, types.UnionType):
        return " | ".join("null" if a is type(None) else _type_name(a) for a in args)
    if origin is tuple:
        return "[" + ", ".join(_type_name(a) for a in args) + "]"
    if origin is list:
        return f"list[{_type_name(args[0])}]"
    return getattr(tp, "__name__", str(tp))


def config_help(section: str | None = None) -> str:
    """Every config field, or one section's, with its type, default and help (``maws-train --help-config``)."""
    sections = {f.name: f for f in dataclasses.fields(Config)}
    if section and section not in sections:
        raise ConfigError(f"config: no section {section!r}; sections are {sorted(sections)}")
    defaults, hints = Config(), typing.get_type_hints(Config)
    blocks = []
    for name, f in sections.items():
        if section and name != section:
            continue
        cls, inst = hints[name], getattr(defaults, name)
        sub = typing.get_type_hints(cls)
        rows = [(f"--{name}.{g.name}", _type_name(sub[g.name]), json.dumps(getattr(inst, g.name)), g.metadata["help"])
                for g in dataclasses.fields(cls)]
        widths = [max(len(r[i]) for r in rows) for i in range(3)]
        blocks.append("\n".join([f"{name}: {f.metadata['help']}"]
                                 + [f"  {k:<{widths[0]}}  {t:<{widths[1]}}  {d:<{widths[2]}}  {h}" for k, t, d, h in rows]))
    return "\n\n".join(blocks)


def _yaml_error(path: Path, e: Exception) -> ConfigError:
    """PyYAML's several-line report as one line: file, line and column, and what is wrong there."""
    mark = getattr(e, "problem_mark", None)
    where = f"{path}:{mark.line + 1}:{mark.column + 1}" if mark is not None else str(path)
    what = ": ".join(w for w in (getattr(e, "context", None), getattr(e, "problem", None)) if w) \
        or str(e).splitlines()[0]
    fix = "indent with spaces: YAML does not allow tabs" if "'\\t'" in what else "fix the file"
    return ConfigError(f"config: {where}: not valid YAML ({what}); {fix} (or set the value with --section.key=value)")


def load_config(path: str | Path | None, overrides: list[str] | None = None) -> Config:
    """Read a YAML config (or the defaults when ``path`` is None) and apply CLI overrides."""
    import yaml

    data: dict = {}
    if path is not None:
        p = Path(path)
        if not p.is_file():
            raise ConfigError(f"config: file {p} does not exist; pass --config PATH to a YAML file (e.g. configs/demo_fmnist.yaml)")
        try:
            data = yaml.safe_load(p.read_text(encoding="utf-8")) or {}
        except yaml.YAMLError as e:
            raise _yaml_error(p, e) from None
        except UnicodeDecodeError:
            raise ConfigError(f"config: {p} is not a text (UTF-8) file; pass --config PATH to a YAML file") from None
        if not isinstance(data, dict):
            raise ConfigError(f"config: {p} must hold a mapping of sections (run, data, model, mae, wsp, eval)")
    return config_from_dict(_merge(data, parse_overrides(overrides or [])))
