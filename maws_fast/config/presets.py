"""Model presets: plain functions from a name to the model fields (``model.preset``)."""
from __future__ import annotations

from maws_fast.config.fields import check
from maws_fast.config.schema import ModelConfig


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


def check_preset(name) -> None:
    """Raise ConfigError naming ``model.preset`` unless ``name`` is a preset."""
    check(isinstance(name, str) and name in PRESETS, "model.preset",
          f"unknown preset {name!r}; choose one of {sorted(PRESETS)}")


def model_preset(name: str, **overrides) -> ModelConfig:
    """A ModelConfig filled from preset ``name``, then ``overrides``."""
    check_preset(name)
    return ModelConfig(preset=name, **{**PRESETS[name](), **overrides})
