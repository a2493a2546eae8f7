"""The attention-backend switch every ViT block goes through.

``attention(q, k, v, backend)`` with q, k, v of shape (B, H, N, Dh). Backends:

* ``"sdpa"``   -- torch.nn.functional.scaled_dot_product_attention (picks flash / efficient /
  cuDNN / math itself).
* ``"manual"`` -- plain matmul-softmax-matmul in the input dtype with an fp32 softmax; the
  reference the others are tested against.

The fused Triton kernel (``"triton"``) and xformers plug in here. A backend that cannot run
raises; it never falls back silently.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

ATTN_BACKENDS = ("sdpa", "manual")


def attention_manual(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Reference non-causal attention; softmax in fp32. (B, H, N, Dh) -> (B, H, N, Dh)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, N, N)
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    return probs @ v


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Non-causal multi-head attention over (B, H, N, Dh) inputs with the chosen backend."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "manual":
        return attention_manual(q, k, v)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTN_BACKENDS}")


def check_attn_backend(backend: str) -> str:
    """Validate a backend name up front (model construction), not at the first forward."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTN_BACKENDS}")
    return backend
