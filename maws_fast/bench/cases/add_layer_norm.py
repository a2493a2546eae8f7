"""add_layer_norm cases: the residual add + LayerNorm of a pre-norm block (``s = residual + x +
x_bias``, ``y = norm(s)``) at the encoder rows (kept tokens + cls, encoder width) and the decoder
rows (all patches + cls, decoder width) of each model's MAE step.

Every case runs as in a block: y feeds the next sublayer and s the next residual add, so the
backward gets both dy and ds (a fixed random ds stands in for the next block's gradient). For
fp16 / bf16 a second case is bf16 autocast's mix: x in the low precision, the residual stream and
the parameters in fp32 (the ViT stream is fp32 there: patch embedding + fp32 pos_embed).

Minimum bytes (e = element size of x, r = of the residual stream and s, p = of the parameters
weight / bias / x_bias; r = p = e except in the fp32-stream cases, where r = p = 4):
forward  = read x (M D e) + residual (M D r) + write s (M D r) + y (M D e) + read 3 params (3 D p)
           + write mean, rstd (2 M 4, fp32, saved for the backward);
backward = read dy (M D e) + ds (M D r) + s (M D r) + mean, rstd (2 M 4) + weight (D p)
           + write dx (M D e; it is also dresidual when r == e, else + M D r) + dweight, dbias, dx_bias (3 D p).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from maws_fast.bench.kernels import Case, MaeShape, dtype_name
from maws_kernels.add_layer_norm import add_layer_norm

EPS = 1e-6
# Liger's fused residual add (LigerFusedAddRMSNorm) is an RMSNorm: no mean, no bias, no x_bias.
LIGER_NA = "Liger fuses the residual add only into RMSNorm (no mean subtracted, no bias), not into LayerNorm"


class _DownstreamGrad(torch.autograd.Function):
    """Returns y unchanged; in the backward s gets ``ds``, as if the next residual add had used it.
    No kernel runs for it in either direction, so every provider is timed on the op alone."""

    @staticmethod
    def forward(ctx, y: torch.Tensor, s: torch.Tensor, ds: torch.Tensor) -> torch.Tensor:
        ctx.ds = ds
        return y.view_as(y)

    @staticmethod
    def backward(ctx, dy: torch.Tensor):
        return dy, ctx.ds, None


def _ours(x, r, w, b, xb, ds) -> torch.Tensor:
    y, s = add_layer_norm(x, r, w, b, EPS, x_bias=xb, backend="triton")
    return _DownstreamGrad.apply(y, s, ds)


def _torch(x, r, w, b, xb, ds) -> torch.Tensor:
    # The unfused block: the Linear's bias add, the residual add, then LayerNorm (eager aten ops).
    s = r + (x + xb)
    y = F.layer_norm(s, (s.shape[-1],), w, b, EPS).to(x.dtype)
    return _DownstreamGrad.apply(y, s, ds)


def _case(label: str, where: str, M: int, D: int, dtype: torch.dtype, stream: torch.dtype, device) -> Case:
    x = torch.randn(M, D, device=device, dtype=dtype, requires_grad=True)
    r = torch.randn(M, D, device=device, dtype=stream, requires_grad=True)
    # the parameters follow the stream: fp32 master weights in the autocast mix
    w = (1 + 0.1 * torch.randn(D, device=device)).to(stream).requires_grad_(True)
    b = (0.1 * torch.randn(D, device=device)).to(stream).requires_grad_(True)
    xb = (0.1 * torch.randn(D, device=device)).to(stream).requires_grad_(True)
    ds = torch.randn(M, D, device=device, dtype=stream)
    e, re = x.element_size(), r.element_size()  # the parameters' element size is re too
    stats = 2 * M * 4  # mean + rstd, fp32
    mixed = stream != dtype
    dx_bytes = M * D * e + (M * D * re if mixed else 0)  # one tensor when the dtypes match
    return Case(
        op="add_layer_norm",
        shape=f"{label} {where} {M}x{D}" + (" fp32-stream" if mixed else ""),
        dtype=dtype_name(dtype),
        args=(x, r, w, b, xb, ds),
        fns={"ours": _ours, "torch": _torch},
        bytes_fwd=2 * M * D * (e + re) + 3 * D * re + stats,
        bytes_bwd=M * D * (e + 2 * re) + stats + D * re + dx_bytes + 3 * D * re,
        extra={"M": M, "D": D, "where": where, "stream": dtype_name(stream)},
        skip={"liger": LIGER_NA},
    )


def cases(shapes: list[MaeShape], dtype: torch.dtype, device) -> Iterator[Case]:
    """Encoder and decoder add + LayerNorm of every shape: (batch * (keep + 1), width) and
    (batch * (num_patches + 1), dec_width) rows; fp16 / bf16 also with an fp32 stream and parameters."""
    streams = (dtype,) if dtype == torch.float32 else (dtype, torch.float32)
    for s in shapes:
        for stream in streams:
            yield _case(s.label, "enc", s.batch * (s.keep + 1), s.width, dtype, stream, device)
            yield _case(s.label, "dec", s.batch * (s.num_patches + 1), s.dec_width, dtype, stream, device)
