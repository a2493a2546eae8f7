"""Fixed 2D sin-cos position embeddings, laid out exactly as the official MAE code.

Half the channels per axis; each half is ``[sin(pos * w), cos(pos * w)]`` concatenated (not
interleaved), ``w_i = 1 / 10000 ** (i / (D / 4))``. The FIRST half encodes the WIDTH (column)
coordinate: the official code's naming is swapped (``emb_h`` is built from the meshgrid's first
output, which varies along columns), and released checkpoints depend on that layout.

A learned table trained at one resolution is carried to another by :func:`resample_pos_embed`.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F


def sincos_1d(dim: int, pos: torch.Tensor) -> torch.Tensor:
    """(M,) positions -> (M, dim) as ``[sin(pos*w), cos(pos*w)]``; computed in float64."""
    if dim % 2:
        raise ValueError(f"sin-cos embedding needs an even dim, got {dim}")
    omega = torch.arange(dim // 2, dtype=torch.float64) / (dim / 2.0)
    omega = 1.0 / 10000**omega  # (dim/2,)
    out = pos.reshape(-1).to(torch.float64)[:, None] * omega[None, :]  # (M, dim/2)
    return torch.cat([torch.sin(out), torch.cos(out)], dim=1)


def sincos_2d(dim: int, grid_h: int, grid_w: int | None = None, cls_token: bool = True) -> torch.Tensor:
    """(grid_h*grid_w [+1], dim) float32 table; row zero is all zeros when ``cls_token``."""
    if dim % 4:
        raise ValueError(f"2D sin-cos embedding needs dim divisible by 4, got {dim}")
    grid_w = grid_h if grid_w is None else grid_w
    rows, cols = torch.meshgrid(
        torch.arange(grid_h, dtype=torch.float64), torch.arange(grid_w, dtype=torch.float64), indexing="ij"
    )
    # First half: width coordinate (cols), second half: height (rows) -- see module docstring.
    emb = torch.cat([sincos_1d(dim // 2, cols), sincos_1d(dim // 2, rows)], dim=1)  # (h*w, dim)
    if cls_token:
        emb = torch.cat([torch.zeros(1, dim, dtype=torch.float64), emb], dim=0)
    return emb.float()


def resample_pos_embed(table: torch.Tensor, grid: int, extra: int = 1) -> torch.Tensor:
    """A learned (1, extra + g*g, D) table for a ``grid`` x ``grid`` patch grid, as the official
    MAE ``interpolate_pos_embed``: the ``extra`` leading (cls) rows kept as they are, the g x g patch
    rows resized bicubically (``align_corners=False``, no antialias) in fp32, returned in the
    table's dtype.

    Raises:
        ValueError: the table's patch rows do not form a square grid.
    """
    n = table.shape[-2] - extra
    g = math.isqrt(max(n, 0))
    if table.ndim != 3 or g * g != n or n == 0:
        raise ValueError(f"a pos-embed of shape {tuple(table.shape)} with {extra} extra row(s) is not a square patch grid")
    if g == grid:
        return table
    head, patches = table[:, :extra], table[:, extra:]
    D = table.shape[-1]
    patches = patches.float().reshape(1, g, g, D).permute(0, 3, 1, 2)  # (1, D, g, g)
    patches = F.interpolate(patches, size=(grid, grid), mode="bicubic", align_corners=False)
    patches = patches.permute(0, 2, 3, 1).reshape(1, grid * grid, D).to(table.dtype)
    return torch.cat([head, patches], dim=1)
