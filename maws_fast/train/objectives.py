"""Training objectives: a module per stage whose ``forward(imgs, targets, step)`` is the loss.

Engines (DDP, FSDP2, ours) wrap and call one module; keeping the loss inside a module's forward
is what lets DDP / FSDP2 see every parameter use (the WSP head runs fused with its loss, outside
the classifier's own forward). The network is ``self.model``, so parameter names stay timm keys.

Data parallel: each of ``data_world`` ranks gets rows ``[r*b, (r+1)*b)`` of the global batch, and
the MAE masking noise is drawn for the GLOBAL batch and sliced the same way, so a sharded run
sees exactly the masks a one-process run of the same global batch does.
"""
from __future__ import annotations

import numpy as np
import torch
import torch.nn as nn

import maws_kernels
from maws_fast.models import op_backend
from maws_fast.parallel.mesh import Mesh, gather_with_grad
from maws_fast.seeds import Stream, mix_seed


def wsp_loss(model: nn.Module, imgs: torch.Tensor, targets) -> torch.Tensor:
    """WSP loss of a classifier: soft-target CE of its head, with head and loss fused.

    At hashtag-vocabulary scale the (B, V) logits then exist one chunk of rows at a time; the
    math is soft_target_cross_entropy(model(imgs), targets).
    """
    backend = op_backend(model.kernel_backend, False)
    feats = model.forward_pooled(imgs)
    if isinstance(targets, (tuple, list)):  # sparse: (B, T) tag ids padded with -1, (B, T) weights
        ids, weights = targets
        return maws_kernels.linear_soft_target_cross_entropy(feats, model.head.weight, model.head.bias,
                                                             target_ids=ids, target_weights=weights, backend=backend)
    return maws_kernels.linear_soft_target_cross_entropy(feats, model.head.weight, model.head.bias, targets,
                                                         backend=backend)


class MAEObjective(nn.Module):
    """MAE loss with masking noise a function of (seed, step) only (resumed runs draw the same masks)."""

    def __init__(self, model: nn.Module, mask_ratio: float, seed: int, data_rank: int = 0, data_world: int = 1):
        super().__init__()
        self.model, self.mask_ratio, self.seed = model, mask_ratio, seed
        self.data_rank, self.data_world = data_rank, data_world

    def forward(self, imgs: torch.Tensor, targets, step: int, micro: int = 0, accum: int = 1) -> torch.Tensor:
        """Loss of micro-batch ``micro`` of ``accum`` of this rank's share of global batch ``step``."""
        g = torch.Generator(device=imgs.device).manual_seed(mix_seed(Stream.MASK, self.seed, step))
        if self.data_world == 1 and accum == 1:
            return self.model(imgs, mask_ratio=self.mask_ratio, generator=g)[0]
        b, L = imgs.shape[0], self.model.patch_embed.num_patches
        noise = torch.rand(b * accum * self.data_world, L, device=imgs.device, generator=g)  # (global B, L)
        first = (self.data_rank * accum + micro) * b  # this micro-batch's rows of the global batch
        return self.model(imgs, mask_ratio=self.mask_ratio, noise=noise[first:first + b])[0]


class WSPObjective(nn.Module):
    """Soft-target cross-entropy of a classifier on (dense or sparse) hashtag targets."""

    def __init__(self, model: nn.Module):
        super().__init__()
        self.model = model

    def forward(self, imgs: torch.Tensor, targets, step: int, micro: int = 0, accum: int = 1) -> torch.Tensor:
        return wsp_loss(self.model, imgs, targets)


class FinetuneObjective(nn.Module):
    """Fine-tune loss: Mixup / CutMix + label smoothing into soft targets, stochastic depth, and the
    soft-target cross-entropy of the classifier's head (fused with its loss, as WSP's).

    Every draw is a function of (seed, step, rank, micro-batch): a resumed run mixes and drops
    exactly as an uninterrupted one. Each data-parallel rank mixes its own share (as timm under
    DDP), so unlike MAE a sharded run is not the same computation as one process.
    """

    def __init__(self, model: nn.Module, mixup, seed: int, data_rank: int = 0):
        super().__init__()
        self.model, self.mixup, self.seed, self.data_rank = model, mixup, seed, data_rank

    def forward(self, imgs: torch.Tensor, labels: torch.Tensor, step: int, micro: int = 0,
                accum: int = 1) -> torch.Tensor:
        which = self.data_rank * accum + micro
        rng = np.random.RandomState(mix_seed(Stream.MIXUP, self.seed, step, which) % 2**32)
        imgs, targets = self.mixup(imgs, labels, rng)
        g = torch.Generator(device=imgs.device).manual_seed(mix_seed(Stream.DROP_PATH, self.seed, step, which))
        self.model.set_drop_path_generator(g)
        try:
            return wsp_loss(self.model, imgs, targets)
        finally:
            self.model.set_drop_path_generator(None)


class LiTObjective(nn.Module):
    """CLIP's symmetric InfoNCE between the locked image tower's embeddings and the text tower's.

    ``forward(inputs, ids, ...)``: ``inputs`` are images (B, C, H, W), run through the locked tower
    under no_grad, or its pooled features (B, W_img) read from a feature cache; ``ids`` the
    captions' token ids (B, N). Under data parallelism both embeddings are all-gathered with their
    gradient and each rank computes the loss of its own rows against everyone's
    (:func:`maws_kernels.contrastive_loss`, whose Triton path never holds the (b, B) logits).
    """

    def __init__(self, model: nn.Module, mesh: Mesh | None = None, kernel_backend: str | None = None):
        super().__init__()
        self.model, self.mesh, self.kernel_backend = model, mesh, kernel_backend

    def forward(self, inputs: torch.Tensor, ids: torch.Tensor, step: int, micro: int = 0,
                accum: int = 1) -> torch.Tensor:
        m = self.model
        pooled = inputs if inputs.ndim == 2 else m.pooled_images(inputs)
        img, txt = m.embed_image_features(pooled), m.encode_texts(ids)
        scale = m.scale()
        if self.mesh is None:
            return maws_kernels.contrastive_loss(img, txt, scale, backend=self.kernel_backend)
        all_img, offset = gather_with_grad(img, self.mesh)  # (img, 0) in one data-parallel rank
        all_txt, _ = gather_with_grad(txt, self.mesh)
        return maws_kernels.contrastive_loss(img, txt, scale, all_image_features=all_img, all_text_features=all_txt,
                                             offset=offset, backend=self.kernel_backend)
