"""A CLIP-shaped pair of towers, named as MAWS's CLIP checkpoints are.

Keys: ``vision_encoder.*`` (the ViT, timm keys), ``vision_projection`` (W_img, E),
``text_encoder.*``, ``text_projection`` (W_txt, E), ``logit_scale`` (0-d, the log of the
similarity multiplier). An embedding is ``normalize(pooled @ projection)``; the multiplier is
``logit_scale.exp()`` clamped at 100 (CLIP's limit; see :meth:`LiT.scale` for its gradient).

LiT locks the image tower (:meth:`LiT.lock_vision`): its parameters take no gradient and it stays
in eval mode through ``train()``; the projection after it is trained. The text tower is any module
from (B, N) ids to (B, W_txt): ours (:class:`~maws_fast.models.text.TextTransformer`) or a
released XLM-R (:mod:`maws_fast.models.maws_clip`).
"""
from __future__ import annotations

import math
from contextlib import nullcontext

import torch
import torch.nn as nn
import torch.nn.functional as F

MAX_LOGIT_SCALE = 100.0


class LiT(nn.Module):
    """Image and text towers with projections to a shared width and a learned temperature.

    Args:
        vision_encoder: a ViT whose ``forward_pooled(images)`` is (B, vision_width).
        text_encoder: a module from (B, N) ids to (B, text_width).
        vision_width, text_width: the towers' pooled widths.
        embed_dim: the shared width E.
        init_logit_scale: the initial ``logit_scale`` (log(1 / 0.07), CLIP's).
    """

    def __init__(self, vision_encoder: nn.Module, text_encoder: nn.Module, vision_width: int, text_width: int,
                 embed_dim: int, init_logit_scale: float = math.log(1 / 0.07)):
        super().__init__()
        self.vision_encoder, self.text_encoder = vision_encoder, text_encoder
        self.vision_projection = nn.Parameter(torch.randn(vision_width, embed_dim) * vision_width ** -0.5)
        self.text_projection = nn.Parameter(torch.randn(text_width, embed_dim) * text_width ** -0.5)
        self.logit_scale = nn.Parameter(torch.tensor(float(init_logit_scale)))
        self.vision_locked = False

    def lock_vision(self) -> LiT:
        """No gradient for the image tower and eval mode for good (LiT's locked image tower)."""
        self.vision_encoder.requires_grad_(False)
        self.vision_encoder.eval()
        self.vision_locked = True
        return self

    def train(self, mode: bool = True) -> LiT:
        super().train(mode)
        if self.vision_locked:
            self.vision_encoder.eval()
        return self

    def scale(self) -> torch.Tensor:
        """The similarity multiplier: ``exp(logit_scale)``, at most 100.

        The value is clamped, the gradient is not: it flows to ``logit_scale`` as if the clamp were
        not there (straight through), so a scale pinned at 100 can come back down. open_clip clamps
        the parameter after every step instead, with the same forward values; a clamp on the value
        alone (``exp().clamp``) would stop the gradient and, with Adam's momentum carrying the
        parameter past log(100), could pin the temperature for good.
        """
        ls = self.logit_scale
        capped = ls + (ls.detach().clamp(max=math.log(MAX_LOGIT_SCALE)) - ls.detach())
        return capped.exp()

    def pooled_images(self, images: torch.Tensor) -> torch.Tensor:
        """The image tower's pooled features (no gradient through a locked tower)."""
        with torch.no_grad() if self.vision_locked else nullcontext():
            return self.vision_encoder.forward_pooled(images)

    def embed_image_features(self, pooled: torch.Tensor) -> torch.Tensor:
        """Pooled image features (B, W_img) -> unit embeddings (B, E)."""
        return F.normalize(pooled.to(self.vision_projection.dtype) @ self.vision_projection, dim=-1)

    def encode_images(self, images: torch.Tensor) -> torch.Tensor:
        return self.embed_image_features(self.pooled_images(images))

    def encode_texts(self, ids: torch.Tensor) -> torch.Tensor:
        """Token ids (B, N) -> unit embeddings (B, E)."""
        t = self.text_encoder(ids)
        return F.normalize(t.to(self.text_projection.dtype) @ self.text_projection, dim=-1)

    def forward(self, images: torch.Tensor, ids: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """(image embeddings, text embeddings, the multiplier), as MAWS's CLIP returns them."""
        return self.encode_images(images), self.encode_texts(ids), self.scale()
