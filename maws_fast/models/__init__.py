"""Models: the ViT encoder (timm keys), the MAE (official keys), weight loading, and builders from a ModelConfig."""
from __future__ import annotations

from maws_fast.config import ModelConfig
from maws_fast.models.mae import MaskedAutoencoderViT
from maws_fast.models.vit import VisionTransformer, op_backend
from maws_fast.models.weights import LoadReport, load_encoder, load_pretrained, unwrap_state_dict

_ENCODER_KEYS = ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads", "mlp_ratio", "attn_backend")


def build_mae(cfg: ModelConfig, norm_pix_loss: bool = True) -> MaskedAutoencoderViT:
    """The MAE described by ``cfg`` (encoder + decoder)."""
    return MaskedAutoencoderViT(
        **{k: getattr(cfg, k) for k in _ENCODER_KEYS},
        decoder_embed_dim=cfg.decoder_embed_dim,
        decoder_depth=cfg.decoder_depth,
        decoder_num_heads=cfg.decoder_num_heads,
        norm_pix_loss=norm_pix_loss,
        kernel_backend=cfg.kernel_backend,
    )


def build_classifier(cfg: ModelConfig, num_classes: int, **kwargs) -> VisionTransformer:
    """The encoder described by ``cfg`` plus a linear head over the cls token; ``kwargs`` go to
    :class:`VisionTransformer` (the fine-tune's ``global_pool``, ``drop_path_rate``, ...)."""
    return VisionTransformer(**{k: getattr(cfg, k) for k in _ENCODER_KEYS}, num_classes=num_classes,
                             kernel_backend=cfg.kernel_backend, **kwargs)


__all__ = ["MaskedAutoencoderViT", "VisionTransformer", "LoadReport", "load_pretrained", "load_encoder", "unwrap_state_dict",
           "op_backend", "build_mae", "build_classifier"]
