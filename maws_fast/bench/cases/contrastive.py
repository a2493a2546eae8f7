"""Contrastive (CLIP / LiT) loss cases: symmetric InfoNCE of B image and B text features.

"ours" is ``maws_kernels.contrastive_loss`` on the Triton backend (the two directions on the
fused linear cross-entropy: the (B, B) logits exist a chunk of rows at a time, gradients computed
in the forward); "torch" is the eager loss (open_clip's ClipLoss: both logits matrices in fp32).
Batch sizes from a LiT run's (16k, the LiT paper's 32k) down; D = 768, a ViT-B/16's width.
The point is peak memory: eager holds O(B^2) fp32 (4 GiB per logits matrix at B = 32k),
ours O(chunk x B) plus the (B, D) gradients.

"liger" (where liger-kernel is installed) is the same two passes on Liger's fused linear
cross-entropy: ``liger_fused_linear_cross_entropy(img * s, txt, arange(B))`` and the same with
the roles swapped, halved (weight gradient accumulated in fp32, as ours).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

import maws_kernels as mk
from maws_fast.bench.kernels import Case, MaeShape, dtype_name, liger_functional

WIDTH = 768


def _liger(img: torch.Tensor, txt: torch.Tensor, logit_scale: torch.Tensor) -> torch.Tensor:
    """Symmetric InfoNCE as two Liger fused linear CE passes, row i's positive being column i."""
    flce = liger_functional().liger_fused_linear_cross_entropy
    labels = torch.arange(img.shape[0], device=img.device)
    scale = logit_scale.reshape(()).to(img.dtype)
    i2t = flce(img * scale, txt, labels, accum_dtype=torch.float32)
    t2i = flce(txt * scale, img, labels, accum_dtype=torch.float32)
    return (i2t + t2i) / 2


def cases(shapes: list[MaeShape], dtype: torch.dtype, device) -> Iterator[Case]:
    es = dtype.itemsize
    gpu = torch.device(device).type == "cuda"
    for B in (4096, 16384, 32768) if gpu else (64,):  # interpreted on CPU: one tiny case
        img = F.normalize(torch.randn(B, WIDTH, device=device), dim=-1).to(dtype).requires_grad_()
        txt = F.normalize(torch.randn(B, WIDTH, device=device), dim=-1).to(dtype).requires_grad_()
        scale = torch.tensor(14.3, device=device, requires_grad=True)
        io = 2 * B * WIDTH * es
        yield Case("contrastive_loss", f"B={B} D={WIDTH}", dtype_name(dtype), (img, txt, scale),
                   {"ours": lambda i, t, s: mk.contrastive_loss(i, t, s, backend="triton"),
                    "torch": lambda i, t, s: mk.contrastive_loss_ref(i, t, s), "liger": _liger},
                   bytes_fwd=2 * io, bytes_bwd=2 * io,
                   flops_fwd=2 * 2 * B * B * WIDTH, flops_bwd=2 * 2 * 2 * B * B * WIDTH,
                   note="two (B, B) GEMMs per direction pass; ours also computes the gradients in the forward")
