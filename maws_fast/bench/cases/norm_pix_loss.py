"""norm_pix_loss cases: MAE decoder output vs the image, 75% of patches removed."""
from __future__ import annotations

from typing import Iterator

import torch

import maws_kernels as mk
from maws_fast.bench.kernels import Case, MaeShape, dtype_name

LIGER_NA = "Liger has no masked per-patch-normalised pixel loss"


def cases(shapes: list[MaeShape], dtype: torch.dtype, device) -> Iterator[Case]:
    es = dtype.itemsize
    dt = dtype_name(dtype)
    seen = set()
    for s in shapes:
        if (s.img, s.patch) in seen:
            continue
        seen.add((s.img, s.patch))
        p, L = s.patch, s.num_patches
        P = p * p * s.chans
        images = torch.randn(s.batch, s.chans, s.img, s.img, device=device, dtype=dtype)
        pred = torch.randn(s.batch, L, P, device=device, dtype=dtype, requires_grad=True)
        mask = torch.ones(s.batch, L, device=device)
        mask.scatter_(1, torch.argsort(torch.rand(s.batch, L, device=device), 1)[:, : s.keep], 0.0)
        removed = s.batch * (L - s.keep) * P * es  # bytes of the removed patches (the only ones read)
        fns = {"ours": lambda a, b, c: mk.norm_pix_loss(a, b, c, p, backend="triton"),
               "torch": lambda a, b, c: mk.norm_pix_loss_ref(a, b, c, p)}
        if "cuda" in mk.available_backends("norm_pix_loss", ("cuda",), device):
            fns["cuda"] = lambda a, b, c: mk.norm_pix_loss(a, b, c, p, backend="cuda")
        yield Case("norm_pix_loss", f"{s.model} b{s.batch} L={L} P={P}", dt, (pred, images, mask), fns,
                   bytes_fwd=2 * removed + mask.numel() * 8,  # pred + image of removed patches; mask in, rows out
                   bytes_bwd=2 * removed + pred.numel() * es + mask.numel() * 4, skip={"liger": LIGER_NA})
