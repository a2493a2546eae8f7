"""bias_gelu cases: the MLP hidden activation ``gelu(fc1(x) + bias)`` of each model's MAE and WSP
steps -- encoder (kept tokens + cls, ``mlp_ratio * width``), decoder (all patches + cls,
``mlp_ratio * dec_width``) and the WSP / fine-tuning encoder (all patches + cls, ``mlp_ratio * width``).

Minimum bytes (e = element size of x, the bias in the same dtype):
forward  = read x + read bias + write y                 = 2 * M * N * e + N * e;
backward = read dy, x, bias + write dx, dbias            = 3 * M * N * e + 2 * N * e
(z = x + bias is recomputed, never stored). Providers: "ours" (Triton, dbias reduced inside the
backward kernel), "ours_sum" (the same kernels, dbias summed by torch from dx afterwards: one more
read of dx, so its GB/s against the same minimum shows what the fusion saves) and "torch"
(``F.gelu(x + bias)``, eager).
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from maws_fast.bench.kernels import Case, MaeShape, dtype_name
from maws_fast.config import model_preset
from maws_kernels.bias_gelu import _bias_gelu_fwd_op, bias_gelu

LIGER_NA = "Liger's GELU kernel is GEGLU (tanh-approximate gelu(a) * b, a gated MLP), not exact gelu(x + bias)"


def _ours(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return bias_gelu(x, b, backend="triton")


def _ours_sum(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    # the custom op with fuse_dbias=False: what bias_gelu does with _FUSE_DBIAS = False (2-D x)
    return _bias_gelu_fwd_op(x, b, False)


def _torch(x: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    return F.gelu(x + b)


def _case(label: str, where: str, M: int, N: int, dtype: torch.dtype, device) -> Case:
    x = torch.randn(M, N, device=device, dtype=dtype, requires_grad=True)
    b = (0.1 * torch.randn(N, device=device)).to(dtype).requires_grad_(True)
    e = x.element_size()
    return Case(
        op="bias_gelu",
        shape=f"{label} {where} {M}x{N}",
        dtype=dtype_name(dtype),
        args=(x, b),
        fns={"ours": _ours, "torch": _torch, "ours_sum": _ours_sum},
        bytes_fwd=2 * M * N * e + N * e,
        bytes_bwd=3 * M * N * e + 2 * N * e,
        extra={"M": M, "N": N, "where": where},
        skip={"liger": LIGER_NA},
    )


def cases(shapes: list[MaeShape], dtype: torch.dtype, device) -> Iterator[Case]:
    """MLP hidden activations of every shape: (batch * (keep + 1), r * width) in the MAE encoder,
    (batch * (num_patches + 1), r * dec_width) in the decoder and (batch * (num_patches + 1),
    r * width) in the WSP encoder, r the preset's mlp_ratio (4 throughout the zoo)."""
    for s in shapes:
        r = model_preset(s.model).mlp_ratio
        yield _case(s.label, "enc", s.batch * (s.keep + 1), int(r * s.width), dtype, device)
        yield _case(s.label, "dec", s.batch * (s.num_patches + 1), int(r * s.dec_width), dtype, device)
        yield _case(s.label, "wsp", s.batch * (s.num_patches + 1), int(r * s.width), dtype, device)
