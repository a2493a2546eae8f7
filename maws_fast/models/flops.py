"""Analytic FLOP counts per image, for MFU (achieved FLOP/s / peak FLOP/s).

Counts matmul FLOPs (2 per multiply-add) of the linear layers, the patch embedding and the two
attention matmuls (QK^T and PV); norms, softmax, GELU and adds are ignored (<1% at ViT widths).
Backward is counted as 2x forward for every layer that trains. MAE counts the patch embedding
over ALL patches, as the official model computes it; with a fused masked patch gather the
embedding runs on the kept patches only (``masked_embed=True``).

Reference points (docs/ARCHITECTURE.md, Facts): MAE ViT-B/16-224 at 75% masking ~59 GFLOP per training image
(the decoder about half); ViT-L/16 ~124.
"""
from __future__ import annotations

from maws_fast.config import ModelConfig


def block_flops(tokens: int, width: int, mlp_ratio: float) -> float:
    """Forward FLOPs of one transformer block over ``tokens`` tokens."""
    hidden = int(width * mlp_ratio)
    linear = 2 * tokens * (3 * width * width + width * width + 2 * width * hidden)  # qkv, proj, fc1, fc2
    attn = 2 * 2 * tokens * tokens * width  # QK^T and PV over all heads
    return float(linear + attn)


def encoder_flops(cfg: ModelConfig, tokens: int, embedded_patches: int) -> float:
    """Forward FLOPs of the encoder: patch embed on ``embedded_patches`` + blocks on ``tokens``."""
    patch_dim = cfg.patch_size**2 * cfg.in_chans
    embed = 2 * embedded_patches * patch_dim * cfg.embed_dim
    return embed + cfg.depth * block_flops(tokens, cfg.embed_dim, cfg.mlp_ratio)


def mae_flops(cfg: ModelConfig, mask_ratio: float = 0.75, masked_embed: bool = False) -> dict[str, float]:
    """Per-image FLOPs of one MAE training step (forward + backward), with a breakdown."""
    L = cfg.num_patches
    keep = int(L * (1 - mask_ratio))
    enc = encoder_flops(cfg, keep + 1, keep if masked_embed else L)
    dec_embed = 2 * (keep + 1) * cfg.embed_dim * cfg.decoder_embed_dim
    dec_blocks = cfg.decoder_depth * block_flops(L + 1, cfg.decoder_embed_dim, cfg.mlp_ratio)
    dec_pred = 2 * L * cfg.decoder_embed_dim * cfg.patch_size**2 * cfg.in_chans
    dec = dec_embed + dec_blocks + dec_pred
    fwd = enc + dec
    return {"encoder_fwd": enc, "decoder_fwd": dec, "forward": fwd, "train": 3 * fwd}


def classifier_flops(cfg: ModelConfig, num_classes: int, train_encoder: bool = True) -> dict[str, float]:
    """Per-image FLOPs of a classifier step (WSP / fine-tune, or linear probe if not train_encoder)."""
    L = cfg.num_patches
    enc = encoder_flops(cfg, L + 1, L)
    head = 2 * cfg.embed_dim * num_classes
    fwd = enc + head
    train = 3 * fwd if train_encoder else enc + 3 * head
    return {"encoder_fwd": enc, "head_fwd": head, "forward": fwd, "train": train}


def flops_per_image(cfg: ModelConfig, stage: str, num_classes: int = 1000, mask_ratio: float = 0.75) -> float:
    """Training FLOPs per image for ``stage`` in {mae, wsp, finetune, linprobe}; ``eval`` = forward only."""
    if stage == "mae":
        return mae_flops(cfg, mask_ratio)["train"]
    if stage in ("wsp", "finetune"):
        return classifier_flops(cfg, num_classes)["train"]
    if stage == "linprobe":
        return classifier_flops(cfg, num_classes, train_encoder=False)["train"]
    if stage == "eval":
        return classifier_flops(cfg, num_classes)["forward"]
    raise ValueError(f"unknown stage {stage!r}; choose mae, wsp, finetune, linprobe or eval")
