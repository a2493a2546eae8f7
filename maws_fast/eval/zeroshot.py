"""Zero-shot classification with an aligned (image, text) tower pair, the CLIP / LiT way.

* The classifier: for each class, its name in every prompt template, each prompt encoded by the
  text tower and L2-normalised, the mean over templates re-normalised (CLIP's prompt ensembling).
* The prediction: the cosine similarity of each L2-normalised image embedding with every class
  vector; top-1 / top-5 accuracy against the labels.

Tower-agnostic: the text side is a function from a list of strings to a (n, D) tensor, so LiT's
text tower, a released MAWS CLIP text encoder or a stand-in in a test all plug in the same way.
"""
from __future__ import annotations

from typing import Callable, Sequence

import torch
import torch.nn.functional as F

# A short prompt ensemble in the style of CLIP's (a class name inside a sentence about a photo);
# callers with a dataset-specific set pass their own.
DEFAULT_TEMPLATES = (
    "a photo of a {}.",
    "a photo of the {}.",
    "a blurry photo of a {}.",
    "a close-up photo of a {}.",
    "a low resolution photo of a {}.",
    "a good photo of a {}.",
    "a black and white photo of a {}.",
)


@torch.no_grad()
def class_embeddings(encode_text: Callable[[list[str]], torch.Tensor], classnames: Sequence[str],
                     templates: Sequence[str] = DEFAULT_TEMPLATES, batch_size: int = 256) -> torch.Tensor:
    """(C, D) unit vectors, one per class: mean over templates of the normalised prompt embeddings,
    re-normalised.

    Raises:
        ValueError: no class names, no templates, or a template without exactly one ``{}``.
    """
    if not classnames:
        raise ValueError("zero-shot: no class names")
    if not templates:
        raise ValueError("zero-shot: no prompt templates")
    bad = [t for t in templates if t.count("{}") != 1]
    if bad:
        raise ValueError(f"zero-shot: each template needs exactly one '{{}}' for the class name; got {bad[:3]}")
    prompts = [t.format(c) for c in classnames for t in templates]
    emb = torch.cat([encode_text(prompts[i:i + batch_size]) for i in range(0, len(prompts), batch_size)])
    if emb.shape[0] != len(prompts):
        raise ValueError(f"zero-shot: encode_text returned {emb.shape[0]} rows for {len(prompts)} prompts")
    emb = F.normalize(emb.float(), dim=-1).reshape(len(classnames), len(templates), -1).mean(1)
    return F.normalize(emb, dim=-1)


@torch.no_grad()
def zero_shot_accuracy(image_features: torch.Tensor, labels: torch.Tensor, classes: torch.Tensor,
                       ks: Sequence[int] = (1, 5)) -> dict[str, float]:
    """``{"top1": ..., "top5": ...}`` (fractions) of (N, D) image features against (C, D) class vectors.

    A k larger than the number of classes counts every sample as correct (as top-5 of a 3-way task).
    """
    if image_features.shape[0] != labels.shape[0]:
        raise ValueError(f"zero-shot: {image_features.shape[0]} images but {labels.shape[0]} labels")
    if image_features.shape[1] != classes.shape[1]:
        raise ValueError(f"zero-shot: image features are {image_features.shape[1]}-d, class vectors "
                         f"{classes.shape[1]}-d: project both towers to the shared width first")
    logits = F.normalize(image_features.float(), dim=-1) @ classes.float().T
    ranked = logits.argsort(dim=1, descending=True)
    hit = ranked == labels.view(-1, 1).to(ranked.device)
    return {f"top{k}": hit[:, :k].any(1).float().mean().item() for k in ks}
