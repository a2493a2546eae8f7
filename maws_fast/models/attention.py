"""The attention-backend switch every ViT block goes through.

``attention(q, k, v, backend)`` with q, k, v of shape (B, H, N, Dh). Backends:

* ``"triton"``   -- ``maws_kernels.attention``: our flash attention (any N, head dim <= 128). On a
  CPU it runs only under Triton's interpreter (``TRITON_INTERPRET=1``), a correctness tool.
* ``"sdpa"``     -- torch.nn.functional.scaled_dot_product_attention (picks flash / efficient /
  cuDNN / math itself).
* ``"xformers"`` -- ``xformers.ops.memory_efficient_attention`` (BMHK layout; GPU only).
* ``"manual"``   -- plain matmul-softmax-matmul in the input dtype with an fp32 softmax; the
  reference the others are tested against.

A backend that cannot run raises :class:`maws_kernels.BackendUnavailableError` naming why; it
never falls back silently.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

import maws_kernels
from maws_fast.config import ATTN_BACKENDS


def attention_manual(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: float | None = None) -> torch.Tensor:
    """Reference non-causal attention; softmax in fp32. (B, H, N, Dh) -> (B, H, N, Dh)."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    scores = (q @ k.transpose(-2, -1)) * scale  # (B, H, N, N)
    probs = scores.float().softmax(dim=-1).to(q.dtype)
    return probs @ v


def _xformers_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    try:
        import xformers.ops as xops
    except ImportError as e:
        raise maws_kernels.BackendUnavailableError(
            f"attention backend 'xformers' is unavailable: xformers is not installed ({e}); "
            "pip install xformers (built for your torch) or choose triton / sdpa") from None
    if q.device.type != "cuda":
        raise maws_kernels.BackendUnavailableError(
            f"attention backend 'xformers' is unavailable: it has no operator for {q.device.type} tensors; "
            "choose triton / sdpa / manual")
    # xformers wants BMHK = (B, N, H, Dh): a transposed view, no copy
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Non-causal multi-head attention over (B, H, N, Dh) inputs with the chosen backend."""
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "triton":
        return maws_kernels.attention(q, k, v, backend="triton")
    if backend == "manual":
        return attention_manual(q, k, v)
    if backend == "xformers":
        return _xformers_attention(q, k, v)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTN_BACKENDS}")


def attention_packed(qkv: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Attention on the qkv projection's output seen as (B, N, 3, H, Dh); returns (B, N, H, Dh).

    ``triton`` reads q, k and v in place and writes its gradient packed (no stack, no copy); the
    other backends unpack to (B, H, N, Dh) views, as timm does.
    """
    if backend == "triton":
        return maws_kernels.attention_qkvpacked(qkv, backend="triton")
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, Dh)
    return attention(q, k, v, backend).transpose(1, 2)


def available_attn_backends(device: torch.device | str) -> list[str]:
    """The backends worth running on ``device`` here, for benchmark defaults. Triton on a CPU is the
    interpreter (a correctness tool, ~1 ms per program): it runs when named, but is not listed."""
    device = torch.device(device)
    out = ["sdpa", "manual"]
    if device.type == "cuda":
        out.insert(0, "triton")
    if device.type == "cuda":
        try:
            import xformers.ops  # noqa: F401
            out.insert(-1, "xformers")
        except ImportError:
            pass
    return out


def check_attn_backend(backend: str) -> str:
    """Validate a backend name up front (model construction), not at the first forward."""
    if backend not in ATTN_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTN_BACKENDS}")
    return backend
