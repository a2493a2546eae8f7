"""Drop-in modules over the maws_kernels ops, shaped like the torch / timm modules they replace.

Each keeps the parameter names (and so the ``state_dict`` keys) of the module it stands for, and
takes a ``backend`` (None = the best for the input's device: the Triton kernel on a GPU where
Triton is installed, torch's own op on a CPU):

* :class:`LayerNorm` -- ``nn.LayerNorm`` (a subclass: ``weight``, ``bias``, ``eps``). Given a
  ``residual`` too, ``forward(x, residual, x_bias=None)`` returns ``(norm(s), s)`` for
  ``s = residual + x + x_bias`` in one pass (:meth:`LayerNorm.forward_add`: the residual add of a
  pre-norm block and the norm after it, backward fused too); :meth:`LayerNorm.add_backend` says
  whether that pass is a fused kernel on a device (a block keeps torch's separate add otherwise).
* :class:`AddLayerNorm` -- a LayerNorm whose ``forward(x, residual=None, x_bias=None)`` always
  returns that pair (``(norm(x), x)`` without a residual, for the first block of a stack).
* :class:`Attention` -- timm's ViT ``Attention`` (``qkv``, ``proj``), non-causal, no mask, with the
  attention backends ``"triton"`` (ours), ``"sdpa"``, ``"xformers"``, ``"manual"``. ``forward(x,
  seq=Packed(...))`` attends within each of several sequences packed into one (1, T, D) stream
  (:class:`Packed`, :func:`attend_varlen`); ``forward_without_bias`` leaves the projection's bias
  for a fused kernel after it to add (:func:`linear_without_bias`).
* :class:`Mlp` -- timm's ``Mlp`` (``fc1``, ``act``, ``fc2``) with fc1's bias and the exact GELU in one
  kernel whose backward also reduces the bias gradient. fc1 may be an ``nn.Linear`` or a layer with
  a ``forward_without_bias`` (a tensor-parallel one); anything else runs unfused.
* :class:`SoftTargetCrossEntropy` -- timm's loss of that name (dense soft targets), plus sparse
  targets (``target_ids`` / ``target_weights``).
* :class:`NormPixLoss` -- MAE's normalised-pixel loss on removed patches, targets read from the
  images.

The attention backend switch is here too (:func:`attend`, :func:`attend_packed`, and
:func:`attend_varlen` for packed sequences of different lengths, e.g. a text tower's captions):
``"triton"`` is :func:`maws_kernels.attention` (any N, head dim <= 128; on a CPU only under
Triton's interpreter, a correctness tool), ``"sdpa"`` torch's ``scaled_dot_product_attention``,
``"xformers"`` its memory-efficient attention (GPU only), ``"manual"`` matmul-softmax-matmul with
an fp32 softmax, the reference the others are tested against. A backend that cannot run raises
:class:`~maws_kernels.BackendUnavailableError` naming why; none falls back.

The maws_fast trainer's ViT, MAE and text tower are built from these modules.
"""
from __future__ import annotations

from contextlib import nullcontext
from typing import NamedTuple

import torch
import torch.nn as nn
import torch.nn.functional as F

from maws_kernels._backend import BACKENDS, TRITON_ERROR, BackendUnavailableError, backend_problem, resolve_backend
from maws_kernels.add_layer_norm import add_layer_norm
from maws_kernels.attention import attention, attention_qkvpacked, attention_varlen
from maws_kernels.bias_gelu import bias_gelu
from maws_kernels.cross_entropy import soft_target_cross_entropy
from maws_kernels.layer_norm import layer_norm
from maws_kernels.norm_pix_loss import norm_pix_loss

# "triton" is maws_kernels.attention; the others are torch's SDPA, xformers' memory-efficient
# attention and a plain matmul-softmax-matmul reference.
ATTENTION_BACKENDS = ("triton", "sdpa", "xformers", "manual")


def _check_backend(backend: str | None) -> str | None:
    if backend is not None and backend not in BACKENDS:
        raise ValueError(f"maws_kernels.nn: unknown backend {backend!r}; choose one of {BACKENDS} or None")
    return backend


# --- attention backends ---------------------------------------------------------------------------
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
        raise BackendUnavailableError(
            f"attention backend 'xformers' is unavailable: xformers is not installed ({e}); "
            "pip install xformers (built for your torch) or choose triton / sdpa") from None
    if q.device.type != "cuda":
        raise BackendUnavailableError(
            f"attention backend 'xformers' is unavailable: it has no operator for {q.device.type} tensors; "
            "choose triton / sdpa / manual")
    # xformers wants BMHK = (B, N, H, Dh): a transposed view, no copy
    out = xops.memory_efficient_attention(q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2))
    return out.transpose(1, 2)


def check_attention_backend(backend: str) -> str:
    """Validate an attention backend name up front (module construction), not at the first forward."""
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
    return backend


def attention_backend_problem(backend: str, device: torch.device | str) -> str | None:
    """Why attention backend ``backend`` cannot run on ``device`` in this process, or None if it can
    (``sdpa`` and ``manual`` run anywhere); for a check before any work, not at the first forward."""
    check_attention_backend(backend)
    device = torch.device(device)
    if backend == "triton":
        return backend_problem("triton", device)
    if backend == "xformers":
        try:
            import xformers.ops  # noqa: F401
        except ImportError as e:
            return f"xformers is not installed ({e}); pip install xformers (built for your torch)"
        if device.type != "cuda":
            return f"xformers has no attention operator for {device.type} tensors"
    return None


def default_attention_backend(device: torch.device | str) -> str:
    """Ours ("triton") on a GPU where Triton is installed, else torch's SDPA."""
    return "triton" if torch.device(device).type == "cuda" and TRITON_ERROR is None else "sdpa"


def attend(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Non-causal multi-head attention over (B, H, N, Dh) inputs with the chosen backend.

    A backend that cannot run raises :class:`BackendUnavailableError` naming why; none falls back.
    """
    if backend == "sdpa":
        return F.scaled_dot_product_attention(q, k, v)
    if backend == "triton":
        return attention(q, k, v, backend="triton")
    if backend == "manual":
        return attention_manual(q, k, v)
    if backend == "xformers":
        return _xformers_attention(q, k, v)
    raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")


def attend_packed(qkv: torch.Tensor, backend: str = "sdpa") -> torch.Tensor:
    """Attention on the qkv projection's output seen as (B, N, 3, H, Dh); returns (B, N, H, Dh).

    ``triton`` reads q, k and v in place and writes its gradient packed (no stack, no copy); the
    other backends unpack to (B, H, N, Dh) views, as timm does.
    """
    if backend == "triton":
        return attention_qkvpacked(qkv, backend="triton")
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, Dh)
    return attend(q, k, v, backend).transpose(1, 2)


class Packed(NamedTuple):
    """Sequences of different lengths packed back to back as one (1, T, D) stream: each token
    attends only within its sequence (a text tower's captions; no padding is computed).

    ``cu_seqlens``: (S + 1,) int32 prefix sums of the S lengths; ``max_seqlen``: a bound on them
    (a Python int, so nothing waits for the device)."""

    cu_seqlens: torch.Tensor
    max_seqlen: int


def _padded(t: torch.Tensor, seq_id: torch.Tensor, pos: torch.Tensor, num_seqs: int, max_seqlen: int) -> torch.Tensor:
    """Packed (T, H, Dh) -> (S, H, max_seqlen, Dh), zeros past each sequence's end."""
    out = t.new_zeros(num_seqs, max_seqlen, *t.shape[1:])
    out[seq_id, pos] = t
    return out.transpose(1, 2)


def attend_varlen(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
                  backend: str = "sdpa") -> torch.Tensor:
    """Non-causal attention within each of S packed sequences: q, k, v (T, H, Dh) back to back,
    ``cu_seqlens`` (S + 1,) int32 prefix sums of the lengths, ``max_seqlen`` an upper bound of them
    (a Python int). Returns (T, H, Dh).

    ``triton`` runs :func:`maws_kernels.attention_varlen` on the packed tokens (no padding at all).
    ``sdpa`` and ``manual`` pad to (S, H, max_seqlen, Dh) and mask the keys past each end (padded
    queries are computed and dropped); ``xformers`` runs its block-diagonal mask (GPU, one host
    read of the lengths).
    """
    if backend == "triton":
        return attention_varlen(q, k, v, cu_seqlens, max_seqlen, backend="triton")
    if backend not in ATTENTION_BACKENDS:
        raise ValueError(f"unknown attention backend {backend!r}; choose one of {ATTENTION_BACKENDS}")
    T, S = q.shape[0], cu_seqlens.numel() - 1
    starts, lengths = cu_seqlens[:-1].long(), (cu_seqlens[1:] - cu_seqlens[:-1]).long()
    if backend == "xformers":
        if q.device.type != "cuda":
            _xformers_attention(q, k, v)  # raises the backend's error
        from xformers.ops import fmha

        bias = fmha.attn_bias.BlockDiagonalMask.from_seqlens(lengths.tolist())
        return fmha.memory_efficient_attention(q.unsqueeze(0), k.unsqueeze(0), v.unsqueeze(0), attn_bias=bias)[0]
    seq_id = torch.repeat_interleave(torch.arange(S, device=q.device), lengths, output_size=T)  # no host sync
    pos = torch.arange(T, device=q.device) - starts[seq_id]
    qp, kp, vp = (_padded(t, seq_id, pos, S, int(max_seqlen)) for t in (q, k, v))  # (S, H, M, Dh)
    keep = (torch.arange(int(max_seqlen), device=q.device) < lengths[:, None])[:, None, None, :]  # (S, 1, 1, M)
    if backend == "sdpa":
        o = F.scaled_dot_product_attention(qp, kp, vp, attn_mask=keep)
    else:  # manual: the reference, fp32 softmax
        scores = (qp @ kp.transpose(-2, -1)) * q.shape[-1] ** -0.5
        o = scores.float().masked_fill(~keep, float("-inf")).softmax(dim=-1).to(q.dtype) @ vp
    return o.transpose(1, 2)[seq_id, pos]


def available_attention_backends(device: torch.device | str) -> list[str]:
    """The backends worth running on ``device`` here, best first (benchmark defaults). Triton on a CPU
    is the interpreter (a correctness tool, ~1 ms per program): it runs when named, but is not listed."""
    device = torch.device(device)
    out = ["sdpa", "manual"]
    if device.type == "cuda" and TRITON_ERROR is None:
        out.insert(0, "triton")
    if device.type == "cuda":
        try:
            import xformers.ops  # noqa: F401
            out.insert(-1, "xformers")
        except ImportError:
            pass
    return out


# --- modules --------------------------------------------------------------------------------------
def linear_without_bias(linear: nn.Module, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(``linear(x)`` without its bias, the bias) for a fused kernel to add. An ``nn.Linear`` runs
    its GEMM alone; a layer that knows how (a tensor-parallel one) says so with a
    ``forward_without_bias(x)``; anything else runs whole (bias None)."""
    if type(linear) is nn.Linear:
        return F.linear(x, linear.weight), linear.bias
    if hasattr(linear, "forward_without_bias"):
        return linear.forward_without_bias(x)
    return linear(x), None


class LayerNorm(nn.LayerNorm):
    """``nn.LayerNorm`` over the last dim that runs :func:`maws_kernels.layer_norm`, and with a
    residual :func:`maws_kernels.add_layer_norm` (:meth:`forward_add`).

    Same constructor (plus ``backend``), same parameters and keys. A normalized_shape of more than
    one dim runs torch's own ops. Input and output keep the input's dtype (statistics in fp32) on
    every backend, autocast or not: CUDA autocast would run torch's layer_norm in fp32 and hand an
    fp32 tensor to the next layer.
    """

    def __init__(self, normalized_shape, eps: float = 1e-5, elementwise_affine: bool = True, bias: bool = True,
                 device=None, dtype=None, backend: str | None = None):
        super().__init__(normalized_shape, eps=eps, elementwise_affine=elementwise_affine, bias=bias,
                         device=device, dtype=dtype)
        self.backend = _check_backend(backend)

    @classmethod
    def from_module(cls, norm: nn.LayerNorm, backend: str | None = None) -> "LayerNorm":
        """One of these holding ``norm``'s own parameters (the same tensors, not copies)."""
        new = cls(norm.normalized_shape, eps=norm.eps, elementwise_affine=False, bias=False, device="meta",
                  backend=backend)
        new.elementwise_affine = norm.elementwise_affine
        new.weight, new.bias = norm.weight, norm.bias  # Parameters or None, registered as parameters
        new.train(norm.training)
        return new

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, x_bias: torch.Tensor | None = None,
                backend: str | None = None):
        """The norm of ``x``; with a ``residual`` (the stream ``x`` is to be added to), the pair
        ``(norm(s), s)`` for ``s = residual + x + x_bias`` (:meth:`forward_add`). ``backend``
        overrides ``self.backend`` for this call."""
        if residual is not None:
            return self.forward_add(x, residual, x_bias, backend)
        if len(self.normalized_shape) != 1:
            return super().forward(x)
        with _no_autocast(x):
            return layer_norm(x, self.weight, self.bias, self.eps, backend=backend or self.backend)

    def add_backend(self, x: torch.Tensor) -> str | None:
        """The backend of :meth:`forward_add` on ``x``'s device when it is a fused kernel; None when
        it would be torch's add then layer_norm (a caller then keeps its unfused code, bit for bit)."""
        if len(self.normalized_shape) != 1:
            return None
        backend = resolve_backend("add_layer_norm", self.backend, ("triton", "torch"), x.device)
        return None if backend == "torch" else backend

    def forward_add(self, x: torch.Tensor, residual: torch.Tensor | None = None, x_bias: torch.Tensor | None = None,
                    backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        """``(norm(s), s)`` with ``s = residual + x + x_bias`` (a None term left out) in one pass,
        backward fused as well: a block's residual add (``x`` its branch, ``x_bias`` that branch's
        last bias, left out of its GEMM) and the LayerNorm after it. ``backend`` overrides
        ``self.backend`` for this call."""
        if len(self.normalized_shape) != 1:
            s = x if residual is None else residual + x
            s = s if x_bias is None else s + x_bias
            return F.layer_norm(s, self.normalized_shape, self.weight, self.bias, self.eps), s
        with _no_autocast(x):
            return add_layer_norm(x, residual, self.weight, self.bias, self.eps, x_bias=x_bias,
                                  backend=backend or self.backend)


class AddLayerNorm(LayerNorm):
    """LayerNorm with the residual add before it fused in: ``forward(x, residual=None, x_bias=None)``
    is :meth:`LayerNorm.forward_add`, ``(norm(s), s)`` with ``s = residual + x + x_bias``, in one
    pass forward and backward.

    ``residual=None`` normalises ``x`` alone (and returns ``(norm(x), x)``), so the first block of a
    stack uses the same module.
    """

    def forward(self, x: torch.Tensor, residual: torch.Tensor | None = None, x_bias: torch.Tensor | None = None,
                backend: str | None = None) -> tuple[torch.Tensor, torch.Tensor]:
        return self.forward_add(x, residual, x_bias, backend)


class Attention(nn.Module):
    """timm's ViT self-attention (``qkv`` -> heads -> ``proj``), non-causal and unmasked; or, with
    ``seq`` (:class:`Packed`), within each of the sequences packed into a (1, T, D) input.

    Args:
        dim: width D.
        num_heads: heads H (D divisible by H).
        qkv_bias: bias of the qkv projection (ViTs: True).
        backend: one of :data:`ATTENTION_BACKENDS`, or None for :func:`default_attention_backend`
            of the input's device.
    """

    def __init__(self, dim: int, num_heads: int = 8, qkv_bias: bool = True, proj_bias: bool = True,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        self.backend = None if backend is None else check_attention_backend(backend)
        self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias, device=device, dtype=dtype)
        self.proj = nn.Linear(dim, dim, bias=proj_bias, device=device, dtype=dtype)

    @classmethod
    def from_module(cls, attn: nn.Module, backend: str | None = None) -> "Attention":
        """One of these holding ``attn``'s own ``qkv`` and ``proj`` (a timm Attention without extras)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.num_heads, new.head_dim = attn.num_heads, attn.head_dim
        new.backend = None if backend is None else check_attention_backend(backend)
        new.qkv, new.proj = attn.qkv, attn.proj
        new.train(attn.training)
        return new

    def _mix(self, x: torch.Tensor, seq: Packed | None = None) -> torch.Tensor:
        """(B, N, D) -> the heads' outputs (B, N, H * Dh), before the output projection; with
        ``seq``, x is (1, T, D) of packed sequences, each attending within itself."""
        B, N, _ = x.shape
        qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim)  # a view of the projection
        backend = self.backend or default_attention_backend(x.device)
        if seq is not None:
            if B != 1:
                raise ValueError(f"packed sequences come as one (1, T, D) stream, got a batch of {B}")
            q, k, v = qkv[0].unbind(1)  # each (T, H, Dh)
            return attend_varlen(q, k, v, seq.cu_seqlens, seq.max_seqlen, backend).reshape(B, N, -1)
        return attend_packed(qkv, backend).reshape(B, N, -1)

    def forward(self, x: torch.Tensor, attn_mask: torch.Tensor | None = None, is_causal: bool = False, *,
                seq: Packed | None = None) -> torch.Tensor:
        """(B, N, D) -> (B, N, D); with ``seq``, x is (1, T, D) holding packed sequences
        (:class:`Packed`), each attending within itself."""
        if attn_mask is not None or is_causal:
            raise ValueError("maws_kernels.nn.Attention is non-causal and takes no attn_mask; keep timm's "
                             "Attention for masked or causal attention")
        return self.proj(self._mix(x, seq))

    def forward_without_bias(self, x: torch.Tensor,
                             seq: Packed | None = None) -> tuple[torch.Tensor, torch.Tensor | None]:
        """(the output without the projection's bias, that bias), for a fused residual add to add
        (:meth:`LayerNorm.forward_add`'s ``x_bias``)."""
        return linear_without_bias(self.proj, self._mix(x, seq))

    def extra_repr(self) -> str:
        return f"num_heads={self.num_heads}, backend={self.backend or 'auto'}"


class Mlp(nn.Module):
    """timm's ``Mlp``: ``fc2(gelu(fc1(x)))`` with the exact GELU, fc1's bias and the GELU fused.

    On the "torch" backend it is torch's ``fc1 -> GELU -> fc2``, bit for bit. fc1 runs without its
    bias through :func:`linear_without_bias` (so a tensor-parallel fc1 keeps the fused path); an fc1
    without a bias, or one that cannot leave it out, runs with torch's GELU.
    """

    def __init__(self, in_features: int, hidden_features: int | None = None, out_features: int | None = None,
                 backend: str | None = None, device=None, dtype=None):
        super().__init__()
        hidden_features = hidden_features or in_features
        self.fc1 = nn.Linear(in_features, hidden_features, device=device, dtype=dtype)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden_features, out_features or in_features, device=device, dtype=dtype)
        self.backend = _check_backend(backend)

    @classmethod
    def from_module(cls, mlp: nn.Module, backend: str | None = None) -> "Mlp":
        """One of these holding ``mlp``'s own ``fc1`` and ``fc2`` (a timm Mlp with an exact GELU)."""
        new = cls.__new__(cls)
        nn.Module.__init__(new)
        new.fc1, new.act, new.fc2 = mlp.fc1, nn.GELU(), mlp.fc2
        new.backend = _check_backend(backend)
        new.train(mlp.training)
        return new

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        backend = resolve_backend("bias_gelu", self.backend, ("triton", "torch"), x.device)
        if backend == "torch":  # the reference path, bit for bit the official one
            return self.fc2(self.act(self.fc1(x)))
        # fc1 without its bias; bias + GELU in one kernel whose backward also reduces the bias gradient
        h, b = linear_without_bias(self.fc1, x)
        return self.fc2(self.act(h) if b is None else bias_gelu(h, b, backend=backend))


class SoftTargetCrossEntropy(nn.Module):
    """Cross-entropy against soft targets (timm's ``SoftTargetCrossEntropy``): the mean over rows of
    ``-sum(targets * log_softmax(logits))``, in fp32, never materialising fp32 logits twice.

    ``forward(logits, targets)`` with dense (B, V) targets, or ``forward(logits, target_ids=...,
    target_weights=...)`` with sparse ones (padding ids -1).
    """

    def __init__(self, reduction: str = "mean", backend: str | None = None):
        super().__init__()
        if reduction not in ("mean", "sum", "none"):
            raise ValueError(f"reduction {reduction!r} is not one of mean, sum, none")
        self.reduction, self.backend = reduction, _check_backend(backend)

    def forward(self, logits: torch.Tensor, targets: torch.Tensor | None = None, *,
                target_ids: torch.Tensor | None = None, target_weights: torch.Tensor | None = None) -> torch.Tensor:
        return soft_target_cross_entropy(logits, targets, target_ids=target_ids, target_weights=target_weights,
                                         reduction=self.reduction, backend=self.backend)


class NormPixLoss(nn.Module):
    """MAE's loss: each target patch read from ``images``, normalised by its mean and unbiased std
    (``norm_pix``), MSE per patch, averaged over removed patches (``mask`` = 1).

    ``forward(pred, images, mask)`` with pred (B, L, p*p*C), images (B, C, H, W), mask (B, L).
    """

    def __init__(self, patch_size: int, norm_pix: bool = True, eps: float = 1e-6, backend: str | None = None):
        super().__init__()
        self.patch_size, self.norm_pix, self.eps = patch_size, norm_pix, eps
        self.backend = _check_backend(backend)

    def forward(self, pred: torch.Tensor, images: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return norm_pix_loss(pred, images, mask, self.patch_size, norm_pix=self.norm_pix, eps=self.eps,
                             backend=self.backend)

    def extra_repr(self) -> str:
        return f"patch_size={self.patch_size}, norm_pix={self.norm_pix}, eps={self.eps}"


def _no_autocast(x: torch.Tensor):
    """Autocast off for an op that keeps its input dtype (a no-op context when autocast is off)."""
    return torch.autocast(x.device.type, enabled=False) if torch.is_autocast_enabled(x.device.type) else nullcontext()
