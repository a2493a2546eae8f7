"""Symmetric InfoNCE (the CLIP / LiT loss) without the B x B logits.

For L2-normalised image features I and text features T and a scale s (``logit_scale.exp()``,
clamped at 100 as CLIP does, computed by the caller)::

    loss = (CE(s * I @ T_all.T, pos) + CE(s * T @ I_all.T, pos)) / 2

with ``pos[i] = offset + i``: each local image's own caption among all captions, and each local
caption's own image among all images. In one process ``I_all = I``, ``T_all = T``, ``offset = 0``.
Under data parallelism each rank passes its own rows and the features all-gathered WITH their
gradient from every rank (``maws_fast.parallel.mesh.gather_with_grad``, as open_clip's
``gather_features(..., gather_with_grad=True)`` with ``local_loss=True``), its rows' offset into
them, and averages the gradients over ranks as data parallelism does anyway: the result is the
one-process gradient of the global batch.

Each direction is a row-wise softmax cross-entropy whose "classes" are the other tower's
features, so it runs on :func:`maws_kernels.linear_soft_target_cross_entropy`: on the Triton
backend the (b, B) logits exist one chunk of rows at a time (2^24 elements by default), the
logsumexp of each row is taken online over tiles of columns, and each chunk is turned into its
gradient in place in the same pass, so neither forward nor backward ever holds the B x B matrix
(the memory bound of Inf-CL's tiling; the GEMMs stay cuBLAS's). The positive logit is a sparse
target (one id per row). The "torch" backend is the eager loss, the reference.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from maws_kernels.cross_entropy import linear_soft_target_cross_entropy

_OP = "contrastive_loss"


def _check(image_features, text_features, logit_scale, all_image, all_text, offset):
    """The gathered features (this rank's own where none are given), after checking every argument."""
    all_image = image_features if all_image is None else all_image
    all_text = text_features if all_text is None else all_text
    if image_features.dim() != 2 or text_features.shape != image_features.shape:
        raise ValueError(f"{_OP}: image and text features must both be (b, D); got {tuple(image_features.shape)} "
                         f"and {tuple(text_features.shape)}")
    b, D = image_features.shape
    for name, t in (("all_image_features", all_image), ("all_text_features", all_text)):
        if t.dim() != 2 or t.shape[1] != D:
            raise ValueError(f"{_OP}: {name} must be (B, {D}); got {tuple(t.shape)}")
    if all_image.shape[0] != all_text.shape[0]:
        raise ValueError(f"{_OP}: all_image_features has {all_image.shape[0]} rows, all_text_features "
                         f"{all_text.shape[0]}: gather both towers over the same ranks")
    if not 0 <= offset <= all_image.shape[0] - b:
        raise ValueError(f"{_OP}: offset {offset} puts this rank's {b} rows outside the {all_image.shape[0]} "
                         "gathered ones (offset = rank * local batch)")
    if not isinstance(logit_scale, torch.Tensor) or logit_scale.numel() != 1:
        raise ValueError(f"{_OP}: logit_scale must be a one-element tensor (logit_scale.exp(), clamped), got "
                         f"{type(logit_scale).__name__}")
    return all_image, all_text


def contrastive_loss(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    all_image_features: torch.Tensor | None = None,
    all_text_features: torch.Tensor | None = None,
    offset: int = 0,
    chunk_rows: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Symmetric InfoNCE of this rank's rows, never materialising the (b, B) logits on Triton.

    Args:
        image_features, text_features: (b, D) this rank's L2-normalised features, row i of one the
            pair of row i of the other.
        logit_scale: 0-d (or one-element) tensor, the multiplier of the cosine similarities
            (``logit_scale.exp().clamp(max=100)``); it gets a gradient.
        all_image_features, all_text_features: (B, D) every rank's features gathered with gradient
            (default: this rank's own, i.e. one process).
        offset: where this rank's rows sit in the gathered ones (``rank * b``).
        chunk_rows: rows of logits per chunk (default: 2^24 elements per chunk).
        backend: "triton" | "torch" | None (see maws_kernels._backend).

    Returns:
        0-d fp32 loss: the mean over this rank's rows of the two directions' cross-entropies, halved.
    """
    all_image, all_text = _check(image_features, text_features, logit_scale, all_image_features, all_text_features,
                                 offset)
    b = image_features.shape[0]
    ids = (torch.arange(b, device=image_features.device) + offset).unsqueeze(1)
    ones = torch.ones(b, 1, device=image_features.device, dtype=torch.float32)
    scale = logit_scale.reshape(()).to(image_features.dtype)
    kw = dict(target_ids=ids, target_weights=ones, chunk_rows=chunk_rows, backend=backend)
    i2t = linear_soft_target_cross_entropy(image_features * scale, all_text, None, **kw)
    t2i = linear_soft_target_cross_entropy(text_features * scale, all_image, None, **kw)
    return (i2t + t2i) / 2


def contrastive_loss_ref(
    image_features: torch.Tensor,
    text_features: torch.Tensor,
    logit_scale: torch.Tensor,
    *,
    all_image_features: torch.Tensor | None = None,
    all_text_features: torch.Tensor | None = None,
    offset: int = 0,
) -> torch.Tensor:
    """The eager loss (open_clip's ``ClipLoss`` with ``local_loss=True``): both (b, B) logits in fp32."""
    all_image, all_text = _check(image_features, text_features, logit_scale, all_image_features, all_text_features,
                                 offset)
    labels = torch.arange(image_features.shape[0], device=image_features.device) + offset
    scale = logit_scale.reshape(()).float()
    logits_per_image = scale * image_features.float() @ all_text.float().T
    logits_per_text = scale * text_features.float() @ all_image.float().T
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
