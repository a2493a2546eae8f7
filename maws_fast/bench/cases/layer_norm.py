"""layer_norm cases: the encoder LayerNorm (kept tokens + cls, encoder width) and the decoder
LayerNorm (all patches + cls, decoder width) of each model's MAE step.

Minimum bytes (e = element size of x, the parameters in the same dtype):
forward  = read x + write y + read weight, bias + write mean, rstd (fp32, saved for the backward);
backward = read dy, x, mean, rstd, weight + write dx, dweight, dbias.

"liger" (where liger-kernel is installed) is Liger's LayerNorm, ``liger_layer_norm(x, w, b, eps)``:
the same math, fwd + bwd.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from maws_fast.bench.kernels import Case, MaeShape, dtype_name, liger_functional
from maws_kernels.layer_norm import layer_norm

EPS = 1e-6


def _ours(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return layer_norm(x, w, b, EPS, backend="triton")


def _torch(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.layer_norm(x, (x.shape[-1],), w, b, EPS)


def _liger(x: torch.Tensor, w: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return liger_functional().liger_layer_norm(x, w, b, EPS)


def _case(label: str, where: str, M: int, D: int, dtype: torch.dtype, device) -> Case:
    x = torch.randn(M, D, device=device, dtype=dtype, requires_grad=True)
    w = (1 + 0.1 * torch.randn(D, device=device)).to(dtype).requires_grad_(True)
    b = (0.1 * torch.randn(D, device=device)).to(dtype).requires_grad_(True)
    e = x.element_size()
    stats = 2 * M * 4  # mean + rstd, fp32
    return Case(
        op="layer_norm",
        shape=f"{label} {where} {M}x{D}",
        dtype=dtype_name(dtype),
        args=(x, w, b),
        fns={"ours": _ours, "torch": _torch, "liger": _liger},
        bytes_fwd=2 * M * D * e + 2 * D * e + stats,
        bytes_bwd=3 * M * D * e + stats + 3 * D * e,
        extra={"M": M, "D": D, "where": where},
    )


def cases(shapes: list[MaeShape], dtype: torch.dtype, device) -> Iterator[Case]:
    """Encoder and decoder LayerNorm of every shape: (batch * (keep + 1), width) and
    (batch * (num_patches + 1), dec_width) rows."""
    for s in shapes:
        yield _case(s.label, "enc", s.batch * (s.keep + 1), s.width, dtype, device)
        yield _case(s.label, "dec", s.batch * (s.num_patches + 1), s.dec_width, dtype, device)
