"""Masked autoencoder: a drop-in for the official ``MaskedAutoencoderViT`` (facebookresearch/mae).

Same constructor keywords, same state-dict keys (an official full checkpoint, decoder included,
loads strictly), same ``forward(imgs, mask_ratio) -> (loss, pred, mask)``. Additions: ``noise``
(or a ``generator``) makes the masking reproducible, and the attention / kernel backends are
selectable.
"""
from __future__ import annotations

import torch
import torch.nn as nn
import torch.nn.functional as F

import maws_kernels
from maws_fast.models.pos_embed import sincos_2d
from maws_fast.models.vit import Block, VisionTransformer, init_vit_weights, run_blocks, vit_norm
from maws_kernels.nn import check_attention_backend


def mask_indices(
    batch: int, num_patches: int, mask_ratio: float, device: torch.device | str,
    noise: torch.Tensor | None = None, generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-sample random masking by argsort of noise; the SMALLEST noise values are kept.

    Args:
        batch, num_patches: B and L.
        mask_ratio: fraction removed; ``len_keep = int(L * (1 - mask_ratio))``.
        device: device of the indices.
        noise: optional (B, L) noise in [0, 1); drawn with ``generator`` when None.
        generator: RNG for the noise when ``noise`` is None.

    Returns:
        ids_keep (B, K), mask (B, L) fp32 with 1 = removed in ORIGINAL patch order, ids_restore (B, L).
    """
    B, L = batch, num_patches
    len_keep = int(L * (1 - mask_ratio))
    if noise is None:
        noise = torch.rand(B, L, device=device, generator=generator)
    elif noise.shape != (B, L):
        raise ValueError(f"noise must have shape {(B, L)}, got {tuple(noise.shape)}")
    ids_shuffle = torch.argsort(noise, dim=1)  # ascending: small is keep
    ids_restore = torch.argsort(ids_shuffle, dim=1)
    ids_keep = ids_shuffle[:, :len_keep]  # (B, K)
    mask = torch.ones(B, L, device=device, dtype=torch.float32)  # fp32 as official, whatever the activations
    mask[:, :len_keep] = 0
    mask = torch.gather(mask, 1, ids_restore)  # back to original order
    return ids_keep, mask, ids_restore


def random_masking(
    x: torch.Tensor, mask_ratio: float, noise: torch.Tensor | None = None, generator: torch.Generator | None = None
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The official ``random_masking`` on tokens: (B, L, D) -> x_masked (B, K, D), mask, ids_restore, ids_keep."""
    B, L, D = x.shape
    ids_keep, mask, ids_restore = mask_indices(B, L, mask_ratio, x.device, noise, generator)
    x_masked = torch.gather(x, 1, ids_keep.unsqueeze(-1).expand(-1, -1, D))
    return x_masked, mask, ids_restore, ids_keep


class MaskedAutoencoderViT(VisionTransformer):
    """MAE with a ViT encoder (timm keys) and a light ViT decoder (official keys).

    Args:
        img_size, patch_size, in_chans, embed_dim, depth, num_heads: encoder, as the official one.
        decoder_embed_dim, decoder_depth, decoder_num_heads: decoder (512 / 8 / 16 in every preset).
        mlp_ratio: MLP expansion of both.
        norm_layer: LayerNorm factory (the official presets all pass eps=1e-6; so does the default,
            :func:`~maws_fast.models.vit.vit_norm`).
        norm_pix_loss: normalise each target patch by its mean and unbiased std.
        attn_backend: attention backend of every block (one of ``maws_kernels.nn.ATTENTION_BACKENDS``).
        kernel_backend: maws_kernels backend of the fused ops -- patch gather, LayerNorm, loss
            (None = best available for the device).

    The encoder embeds only the kept patches: ``maws_kernels.masked_patchify`` reads the K kept
    patches from the image and the patch-embed runs as a GEMM on them, with their pos-embed rows
    gathered. That equals the official conv-all-patches, add pos-embed, gather (tested), at a
    quarter of the patch-embed FLOPs and without the (B, L, D) intermediate.
    """

    def __init__(
        self,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        embed_dim: int = 1024,
        depth: int = 24,
        num_heads: int = 16,
        decoder_embed_dim: int = 512,
        decoder_depth: int = 8,
        decoder_num_heads: int = 16,
        mlp_ratio: float = 4.0,
        norm_layer=vit_norm,
        norm_pix_loss: bool = False,
        attn_backend: str = "sdpa",
        kernel_backend: str | None = None,
    ):
        super().__init__(
            img_size=img_size, patch_size=patch_size, in_chans=in_chans, embed_dim=embed_dim, depth=depth,
            num_heads=num_heads, mlp_ratio=mlp_ratio, num_classes=0, pos_embed_learnable=False,
            attn_backend=check_attention_backend(attn_backend), norm_layer=norm_layer, kernel_backend=kernel_backend,
        )
        L = self.patch_embed.num_patches
        self.norm_pix_loss = norm_pix_loss

        self.decoder_embed = nn.Linear(embed_dim, decoder_embed_dim, bias=True)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_embed_dim))
        self.decoder_pos_embed = nn.Parameter(torch.zeros(1, L + 1, decoder_embed_dim), requires_grad=False)
        self.decoder_blocks = nn.ModuleList(
            [Block(decoder_embed_dim, decoder_num_heads, mlp_ratio, attn_backend, norm_layer) for _ in range(decoder_depth)]
        )
        self.decoder_norm = norm_layer(decoder_embed_dim)
        self.decoder_pred = nn.Linear(decoder_embed_dim, patch_size**2 * in_chans, bias=True)
        self._init_decoder()
        self.set_kernel_backend(kernel_backend)  # again: the decoder's LayerNorms exist only now

    def _init_decoder(self) -> None:
        g = self.patch_embed.grid_size
        self.decoder_pos_embed.data.copy_(sincos_2d(self.decoder_pos_embed.shape[-1], g, g, cls_token=True).unsqueeze(0))
        nn.init.normal_(self.mask_token, std=0.02)
        for name, m in self.named_modules():
            if name.startswith("decoder"):
                init_vit_weights(m)

    # --- official helper methods, kept for drop-in use -------------------------------------
    def initialize_weights(self) -> None:
        """Re-run the official MAE initialisation (encoder, then decoder)."""
        self._init_encoder()
        self._init_decoder()

    def patchify(self, imgs: torch.Tensor) -> torch.Tensor:
        """(B, C, H, W) -> (B, L, p*p*C), (p, q, c) order inside a patch."""
        return maws_kernels.patchify(imgs, self.patch_size)

    def unpatchify(self, x: torch.Tensor) -> torch.Tensor:
        """(B, L, p*p*C) -> (B, C, H, W)."""
        return maws_kernels.unpatchify(x, self.patch_size, self.in_chans)

    def random_masking(self, x, mask_ratio, noise=None, generator=None):
        x_masked, mask, ids_restore, _ = random_masking(x, mask_ratio, noise, generator)
        return x_masked, mask, ids_restore

    # --- forward --------------------------------------------------------------------------
    def forward_encoder(self, imgs, mask_ratio, noise=None, generator=None):
        """Encode the kept patches. Returns latent (B, 1+K, D), mask (B, L), ids_restore (B, L)."""
        B = imgs.shape[0]
        if tuple(imgs.shape[-2:]) != self.patch_embed.img_size:
            raise ValueError(f"expected {self.patch_embed.img_size[0]}x{self.patch_embed.img_size[1]} images, "
                             f"got {tuple(imgs.shape[-2:])}")
        ids_keep, mask, ids_restore = mask_indices(B, self.patch_embed.num_patches, mask_ratio, imgs.device, noise,
                                                   generator)
        patches = maws_kernels.masked_patchify(imgs, ids_keep, self.patch_size, backend=self.kernel_backend)
        proj = self.patch_embed.proj  # Conv2d weight (D, C, p, p) -> (D, p*p*C) in the patches' (p, q, c) order
        w = proj.weight.permute(0, 2, 3, 1).reshape(proj.weight.shape[0], -1)
        x = F.linear(patches, w, proj.bias)  # (B, K, D): patch-embed of the kept patches only
        # the same pos-embed rows the official gather would keep, in the activations' dtype (an fp32
        # table would promote the residual stream to fp32 for every block after it)
        x = x + self.pos_embed[0, 1:][ids_keep].to(x.dtype)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).to(x.dtype).expand(B, -1, -1)
        x = torch.cat([cls, x], dim=1)  # cls prepended AFTER masking
        return run_blocks(self.blocks, x, self.norm), mask, ids_restore

    def forward_encoder_official(self, imgs, mask_ratio, noise=None, generator=None):
        """The official order -- embed all L patches, add pos-embed, then mask. Kept as the reference."""
        x = self.patch_embed(imgs) + self.pos_embed[:, 1:, :]  # pos-embed BEFORE masking
        x, mask, ids_restore = self.random_masking(x, mask_ratio, noise, generator)
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)  # cls prepended AFTER masking
        for blk in self.blocks:
            x = blk(x)
        return self.norm(x), mask, ids_restore

    def forward_decoder(self, x: torch.Tensor, ids_restore: torch.Tensor) -> torch.Tensor:
        """(B, 1+K, D) latent -> (B, L, p*p*C) pixel predictions (cls output dropped)."""
        x = self.decoder_embed(x)  # (B, 1+K, Dd)
        B, L = ids_restore.shape
        # mask token and pos-embed in the activations' dtype, so the decoder stream stays bf16 under bf16
        mask_tokens = self.mask_token.to(x.dtype).expand(B, L + 1 - x.shape[1], -1)
        x_ = torch.cat([x[:, 1:, :], mask_tokens], dim=1)  # (B, L, Dd) in shuffled order
        x_ = torch.gather(x_, 1, ids_restore.unsqueeze(-1).expand(-1, -1, x.shape[2]))  # un-shuffle
        x = torch.cat([x[:, :1, :], x_], dim=1) + self.decoder_pos_embed.to(x.dtype)
        x = run_blocks(self.decoder_blocks, x, self.decoder_norm)
        # Dropping the cls row BEFORE the (row-wise) projection gives the official result, skips
        # one row of the GEMM, and leaves pred contiguous for the fused loss.
        return self.decoder_pred(x[:, 1:, :])

    def forward_loss(self, imgs: torch.Tensor, pred: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        """Mean per-patch MSE over removed patches (normalised-pixel targets if norm_pix_loss)."""
        return maws_kernels.norm_pix_loss(
            pred, imgs, mask, self.patch_size, norm_pix=self.norm_pix_loss, backend=self.kernel_backend
        )

    def forward(self, imgs, mask_ratio: float = 0.75, noise=None, generator=None):
        """Returns (loss, pred (B, L, p*p*C), mask (B, L)) as the official model."""
        latent, mask, ids_restore = self.forward_encoder(imgs, mask_ratio, noise, generator)
        pred = self.forward_decoder(latent, ids_restore)
        loss = self.forward_loss(imgs, pred, mask)
        return loss, pred, mask

    def encoder_state_dict(self) -> dict[str, torch.Tensor]:
        """The encoder's tensors only (what released MAWS / MAE checkpoints hold)."""
        return {k: v for k, v in self.state_dict().items() if not (k.startswith("decoder") or k == "mask_token")}
