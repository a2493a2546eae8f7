"""The official-equivalent baselines the step benchmark measures against.

``OfficialMAE`` restates the structure of facebookresearch/mae's ``MaskedAutoencoderViT`` and
``OfficialViT`` that of a timm ``VisionTransformer`` classifier, in plain torch modules:
conv patch embedding of ALL patches, the pos-embed added before masking, a gather of the kept
tokens, timm-style pre-norm blocks (``nn.LayerNorm``, qkv -> reshape -> attention -> proj,
``nn.GELU``), the target patchified in torch and the loss written as the official one. Under bf16
autocast their residual stream stays fp32 (the pos-embed add promotes it), as the official code's
does. Attention is ``F.scaled_dot_product_attention`` -- what today's timm blocks call -- so the
baseline is the fastest unfused model a user would start from, not the 2021 manual softmax.

State-dict keys are the timm / official ones (identical to maws_fast's models), so the same
weights load into both and the tests check that they compute the same loss.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

from maws_fast.config import ModelConfig
from maws_fast.models.pos_embed import sincos_2d


class _Attention(nn.Module):
    def __init__(self, dim: int, heads: int):
        super().__init__()
        self.heads = heads
        self.qkv = nn.Linear(dim, 3 * dim)
        self.proj = nn.Linear(dim, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        B, N, C = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.heads, C // self.heads).permute(2, 0, 3, 1, 4)
        q, k, v = qkv.unbind(0)  # (B, H, N, Dh)
        x = F.scaled_dot_product_attention(q, k, v)
        return self.proj(x.transpose(1, 2).reshape(B, N, C))


class _Mlp(nn.Module):
    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1, self.act, self.fc2 = nn.Linear(dim, hidden), nn.GELU(), nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(self.act(self.fc1(x)))


class _Block(nn.Module):
    def __init__(self, dim: int, heads: int, mlp_ratio: float):
        super().__init__()
        self.norm1 = nn.LayerNorm(dim, eps=1e-6)
        self.attn = _Attention(dim, heads)
        self.norm2 = nn.LayerNorm(dim, eps=1e-6)
        self.mlp = _Mlp(dim, int(dim * mlp_ratio))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class _PatchEmbed(nn.Module):
    def __init__(self, patch: int, chans: int, dim: int):
        super().__init__()
        self.proj = nn.Conv2d(chans, dim, kernel_size=patch, stride=patch)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.proj(x).flatten(2).transpose(1, 2)  # (B, L, D)


class OfficialViT(nn.Module):
    """A timm-structured ViT classifier (cls token, a learned pos-embed started from the sin-cos table as
    WSP trains it, token pooling, head)."""

    def __init__(self, cfg: ModelConfig, num_classes: int):
        super().__init__()
        p, D = cfg.patch_size, cfg.embed_dim
        self.patch_size, self.in_chans = p, cfg.in_chans
        self.patch_embed = _PatchEmbed(p, cfg.in_chans, D)
        self.cls_token = nn.Parameter(torch.randn(1, 1, D) * 0.02)
        self.pos_embed = nn.Parameter(sincos_2d(D, cfg.img_size // p).unsqueeze(0))
        self.blocks = nn.ModuleList([_Block(D, cfg.num_heads, cfg.mlp_ratio) for _ in range(cfg.depth)])
        self.norm = nn.LayerNorm(D, eps=1e-6)
        self.head = nn.Linear(D, num_classes) if num_classes else nn.Identity()

    def forward_features(self, imgs: torch.Tensor) -> torch.Tensor:
        x = self.patch_embed(imgs)
        cls = self.cls_token.expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1) + self.pos_embed
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x)

    def forward(self, imgs: torch.Tensor) -> torch.Tensor:
        return self.head(self.forward_features(imgs)[:, 0])


def soft_target_cross_entropy(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """timm's SoftTargetCrossEntropy: mean over rows of sum(-target * log_softmax(logits))."""
    return torch.sum(-target * F.log_softmax(logits, dim=-1), dim=-1).mean()


class OfficialMAE(OfficialViT):
    """The official MAE's forward, structure for structure (encoder + 8-block decoder + loss)."""

    def __init__(self, cfg: ModelConfig, norm_pix_loss: bool = True):
        super().__init__(cfg, num_classes=0)
        Dd, L, p = cfg.decoder_embed_dim, cfg.num_patches, cfg.patch_size
        self.norm_pix_loss = norm_pix_loss
        self.decoder_embed = nn.Linear(cfg.embed_dim, Dd)
        self.mask_token = nn.Parameter(torch.randn(1, 1, Dd) * 0.02)
        self.decoder_pos_embed = nn.Parameter(sincos_2d(Dd, cfg.img_size // p).unsqueeze(0), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [_Block(Dd, cfg.decoder_num_heads, cfg.mlp_ratio) for _ in range(cfg.decoder_depth)])
        self.decoder_norm = nn.LayerNorm(Dd, eps=1e-6)
        self.decoder_pred = nn.Linear(Dd, p * p * cfg.in_chans)
        self.num_patches = L

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        p, (N, C, H, W) = self.patch_size, imgs.shape
        x = imgs.reshape(N, C, H // p, p, W // p, p)
        return torch.einsum("nchpwq->nhwpqc", x).reshape(N, (H // p) * (W // p), p * p * C)

    def forward_encoder(self, imgs, mask_ratio, noise=None):
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]  # (B, L, D), fp32 under autocast
        B, L, D = x.shape
        keep = int(L * (1 - mask_ratio))
        noise = torch.rand(B, L, device=x.device) if noise is None else noise
        ids_shuffle = torch.argsort(noise, dim=1)
        ids_restore = torch.argsort(ids_shuffle, dim=1)
        x = torch.gather(x, 1, ids_shuffle[:, :keep].unsqueeze(-1).repeat(1, 1, D))
        mask = torch.ones(B, L, device=x.device)
        mask[:, :keep] = 0
        mask = torch.gather(mask, 1, ids_restore)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(B, -1, -1)
        x = torch.cat([cls, x], dim=1)
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x, ids_restore):
        x = self.decoder_embed(x)
        B, L = ids_restore.shape
        mask_tokens = self.mask_token.repeat(B, L + 1 - x.shape[1], 1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).repeat(1, 1, x.shape[2]))
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed
        for blk in self.decoder_blocks:
            x = blk(x)
        x = self.decoder_pred(self.decoder_norm(x))
        return x[:, 1:, :]

    def forward_loss(self, imgs, pred, mask):
        target = self.patchify(imgs)
        if self.norm_pix_loss:
            mean = target.mean(dim=-1, keepdim=True)
            var = target.var(dim=-1, keepdim=True)
            target = (target - mean) / (var + 1.0e-6) ** 0.5
        loss = ((pred - target) ** 2).mean(dim=-1)
        return (loss * mask).sum() / mask.sum()

    def forward(self, imgs, mask_ratio: float = 0.75, noise=None):
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise)
        pred = self.forward_decoder(latent, ids_restore)
        return self.forward_loss(imgs, pred, mask), pred, mask
