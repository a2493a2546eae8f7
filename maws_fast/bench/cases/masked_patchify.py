"""masked_patchify cases: the kept-patch gather alone, and the encoder's patch-embed built on it.

The "embed" case states what the fused gather saves: ours patchifies the K kept patches and runs
the patch-embed as a (B*K, p*p*C) x (p*p*C, D) GEMM; the official MAE convolves all L patches,
adds the pos-embed and gathers K of them, so it does L/K = 4x the patch-embed FLOPs and writes a
(B, L, D) activation of which 75% is thrown away.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

import maws_kernels as mk
from maws_fast.bench.kernels import Case, MaeShape, dtype_name

LIGER_NA = "Liger has no patchify or patch-gather kernel"


def _ids_keep(s: MaeShape, device) -> torch.Tensor:
    return torch.argsort(torch.rand(s.batch, s.num_patches, device=device), dim=1)[:, : s.keep]


def _providers(op, device, **kw):
    fns = {"ours": lambda *a: op(*a, backend="triton", **kw)}
    if "cuda" in mk.available_backends("masked_patchify", ("cuda",), device):
        fns["cuda"] = lambda *a: op(*a, backend="cuda", **kw)
    return fns


def cases(shapes: list[MaeShape], dtype: torch.dtype, device) -> Iterator[Case]:
    es = dtype.itemsize
    dt = dtype_name(dtype)
    seen = set()
    for s in shapes:
        if (s.img, s.patch) in seen:  # B/16 and L/16 share these shapes
            continue
        seen.add((s.img, s.patch))
        P = s.patch * s.patch * s.chans
        images = torch.randn(s.batch, s.chans, s.img, s.img, device=device, dtype=dtype, requires_grad=True)
        ids = _ids_keep(s, device)
        p = s.patch
        kept = s.batch * s.keep * P * es
        fns = _providers(lambda x, i, **kw: mk.masked_patchify(x, i, p, **kw), device)
        fns["torch"] = lambda x, i: mk.masked_patchify_ref(x, i, p)
        yield Case("masked_patchify", f"{s.model} b{s.batch} {s.img}px p{p} K={s.keep}/{s.num_patches}", dt,
                   (images, ids), fns, bytes_fwd=2 * kept + ids.numel() * 8,
                   bytes_bwd=kept + images.numel() * es + ids.numel() * 8, skip={"liger": LIGER_NA})

        # patch-embed of the kept patches (ours) vs conv over all patches + gather (official)
        D = s.width
        w = (torch.randn(D, s.chans, p, p, device=device) * 0.02).to(dtype).requires_grad_()
        b = torch.zeros(D, device=device, dtype=dtype, requires_grad=True)
        pos = torch.randn(1, s.num_patches, D, device=device, dtype=dtype)

        def ours(x, i, w, b, backend="triton"):
            patches = mk.masked_patchify(x, i, p, backend=backend)  # (B, K, P) in (p, q, c) order
            w_pqc = w.permute(0, 2, 3, 1).reshape(D, P)  # conv weight (D, C, p, p) -> (D, p*q*c)
            return F.linear(patches, w_pqc, b) + pos[0, i]  # (B, K, D)

        def official(x, i, w, b):
            t = F.conv2d(x, w, b, stride=p).flatten(2).transpose(1, 2) + pos  # (B, L, D)
            return torch.gather(t, 1, i.unsqueeze(-1).expand(-1, -1, D))

        fns = {"ours": ours, "torch": official}
        if "cuda" in mk.available_backends("masked_patchify", ("cuda",), device):
            fns["cuda"] = lambda *a: ours(*a, backend="cuda")
        yield Case("patch_embed", f"{s.model} b{s.batch} {s.img}px p{p} D={D} K={s.keep}/{s.num_patches}", dt,
                   (images, ids, w, b), fns, bytes_fwd=2 * kept, bytes_bwd=kept,
                   note="ours: embed K kept patches; torch: official conv on all L + gather",
                   extra={"gemm_flops_ours": 2 * s.batch * s.keep * P * D,
                          "gemm_flops_official": 2 * s.batch * s.num_patches * P * D}, skip={"liger": LIGER_NA})
