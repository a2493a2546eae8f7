"""Fused LayerNorm over the last dim: forward and backward in Triton.

``y = (x - mean) * rstd * weight + bias`` with ``mean`` and the BIASED variance of each row over its
D values (as ``torch.nn.functional.layer_norm``), ``rstd = 1 / sqrt(var + eps)``; statistics in fp32.

Forward: each program normalises ``BLOCK_M`` whole rows held in registers (two-pass mean / variance,
no Welford needed because the row is resident) and saves ``mean`` and ``rstd`` (M,) fp32.

Backward: one pass over ``dy`` and ``x``. With ``xhat = (x - mean) * rstd`` and ``g = dy * weight``,
``dx = rstd * (g - xhat * mean(g * xhat) - mean(g))``. ``dweight = sum_rows(dy * xhat)`` and
``dbias = sum_rows(dy)`` come from the same pass: a fixed grid of G persistent programs each walks a
contiguous group of rows, accumulates fp32 partials in registers and writes one (2, D) slab; a small
second kernel sums the (G, 2, D) slabs in a fixed order. No atomics, so the result is deterministic,
and x / dy are read once (torch's native backward reads them again for dweight / dbias).
"""
from __future__ import annotations

import functools
from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from maws_kernels._triton import tl, triton

from maws_kernels._backend import resolve_backend, unit_last_stride
from maws_kernels._scenarios import PRECISIONS, CompileShapes, Scenario, empty, op_impl

_IMPLEMENTED = ("triton", "torch")
_MAX_D = 16384  # a row must fit in registers; beyond this use backend="torch"
_TILE_ELEMS = 4096  # rows * BLOCK_D per program step: enough bytes in flight per SM without spilling
_MAX_ROWS = 32  # rows per program for narrow D (tiny widths only; the model zoo stays <= 8)
_BWD_PROGRAMS_PER_SM = 2  # persistent backward programs per SM (8 warps each, ~100 registers/thread)
_INTERPRET_BWD_PROGRAMS = 4  # interpreter: a few programs, so the multi-program path is still tested
_REDUCE_TILE = 8192  # partial rows * columns per step of the reduction kernel (8 warps: 32 per thread)
_REDUCE_MAX_G = 512  # G up to this is summed in one step (G = 2 * 132 on an H100)


def _config(D: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_M, num_warps) for rows of width D.

    A whole row lives in registers, so BLOCK_D is the next power of two >= D; several rows share a
    program when D is small so each step moves ~_TILE_ELEMS values (16-byte vector loads and enough
    loads in flight). Warps by width for Hopper: the forward holds one array per element (4 warps up
    to 1024 wide, 8 up to 4096, 16 above); the backward holds ~5 (x, dy and the two fp32 partial
    sums), so it uses 8 warps already for narrow rows to keep registers per thread near 100.
    Compiled for sm_90 (Triton 3.7, D = 512..8192, bf16 and fp32): forward 40-72 registers, backward
    99-126 (2 programs of 8 warps per SM), no spills, 16-byte loads and stores throughout.
    """
    block_d = max(16, triton.next_power_of_2(D))
    block_m = max(1, min(_MAX_ROWS, _TILE_ELEMS // block_d))
    if backward:
        warps = 8 if block_d <= 4096 else 16
    else:
        warps = 4 if block_d <= 1024 else 8 if block_d <= 4096 else 16
    # Tiny tiles (D < 128) gain nothing from more warps than 8 values per thread would need.
    warps = max(1, min(warps, block_m * block_d // 256))
    return block_d, block_m, warps


@functools.lru_cache(maxsize=None)
def _num_sms(index: int) -> int:
    return torch.cuda.get_device_properties(index).multi_processor_count


@triton.jit
def normalize_rows(x, mask, cols, col_ok, D, eps, w_ptr, b_ptr, HAS_W: tl.constexpr, HAS_B: tl.constexpr):
    """LayerNorm of an fp32 (BLOCK_M, BLOCK_D) tile over its D valid columns (padding lanes hold 0):
    returns (y fp32, mean, rstd), biased variance as LayerNorm. Shared with add_layer_norm."""
    mean = tl.sum(x, axis=1) / D  # (BLOCK_M,)
    # Padding lanes would contribute mean**2 to the variance: zero them.
    xc = tl.where(mask, x - mean[:, None], 0.0)
    var = tl.sum(xc * xc, axis=1) / D
    rstd = 1.0 / tl.sqrt(var + eps)
    y = xc * rstd[:, None]
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y * w[None, :]
    if HAS_B:
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        y = y + b[None, :]
    return y, mean, rstd


@triton.jit
def load_norm_weight(w_ptr, cols, col_ok, HAS_W: tl.constexpr):
    """The (BLOCK_D,) fp32 weight for :func:`normalize_rows_bwd` (a placeholder 1 without weight)."""
    if HAS_W:
        w = tl.load(w_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
    else:
        w = tl.full(cols.shape, 1.0, tl.float32)
    return w


@triton.jit
def normalize_rows_bwd(dy, x, mean, rstd, w, D, HAS_W: tl.constexpr):
    """LayerNorm's input gradient for an fp32 tile: returns (dx fp32, xhat). ``w`` from
    :func:`load_norm_weight`. Shared with add_layer_norm."""
    xhat = (x - mean[:, None]) * rstd[:, None]
    if HAS_W:
        g = dy * w[None, :]
    else:
        g = dy
    c1 = tl.sum(g * xhat, axis=1) / D  # (BLOCK_M,)
    c2 = tl.sum(g, axis=1) / D
    dx = (g - (xhat * c1[:, None] + c2[:, None])) * rstd[:, None]
    return dx, xhat


@triton.jit
def _layer_norm_fwd_kernel(
    x_ptr,  # (M, D) row stride stride_x, unit column stride
    w_ptr,  # (D,) or a dummy when HAS_W is False
    b_ptr,  # (D,) or a dummy when HAS_B is False
    y_ptr,  # (M, D) contiguous, x's dtype
    mean_ptr,  # (M,) fp32
    rstd_ptr,  # (M,) fp32
    M, D, stride_x, eps,
    HAS_W: tl.constexpr,
    HAS_B: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    row_ok = rows < M
    col_ok = cols < D
    mask = row_ok[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)  # M * D may exceed 2**31

    x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    y, mean, rstd = normalize_rows(x, mask, cols, col_ok, D, eps, w_ptr, b_ptr, HAS_W, HAS_B)
    tl.store(y_ptr + rows64[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _layer_norm_bwd_kernel(
    dy_ptr,  # (M, D) row stride stride_dy, unit column stride
    x_ptr,  # (M, D) row stride stride_x, unit column stride
    w_ptr,  # (D,) or a dummy when HAS_W is False
    mean_ptr,  # (M,) fp32
    rstd_ptr,  # (M,) fp32
    dx_ptr,  # (M, D) contiguous, x's dtype
    part_ptr,  # (G, 2, D) fp32: per-program [sum dy * xhat, sum dy] over its rows
    M, D, stride_dy, stride_x, rows_per_prog,
    HAS_W: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    col_ok = cols < D
    w = load_norm_weight(w_ptr, cols, col_ok, HAS_W)
    # 2-D accumulators: the sum over rows is done once at the end, not in every step.
    dw_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    db_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        x = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        # Padding lanes have xhat = -mean * rstd but dy = 0, so they add nothing to any sum below.
        dx, xhat = normalize_rows_bwd(dy, x, mean, rstd, w, D, HAS_W)
        tl.store(dx_ptr + rows64[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        dw_acc += dy * xhat
        db_acc += dy
    part = part_ptr + pid.to(tl.int64) * 2 * D
    tl.store(part + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    tl.store(part + D + cols, tl.sum(db_acc, axis=0), mask=col_ok)


@triton.jit
def sum_partials(part_ptr, row, G, D, cols, col_ok, K: tl.constexpr, BLOCK_G: tl.constexpr,
                  BLOCK_N: tl.constexpr):
    """Column sums over G of slab row ``row`` of (G, K, D) fp32 per-program partials, in a fixed
    order (deterministic): the second pass of every two-pass column reduction here."""
    acc = tl.zeros((BLOCK_G, BLOCK_N), dtype=tl.float32)
    for g0 in range(0, G, BLOCK_G):
        grp = g0 + tl.arange(0, BLOCK_G)  # (BLOCK_G,)
        mask = (grp < G)[:, None] & col_ok[None, :]
        acc += tl.load(part_ptr + (grp.to(tl.int64)[:, None] * K + row) * D + cols[None, :], mask=mask, other=0.0)
    return tl.sum(acc, axis=0)  # (BLOCK_N,)


@triton.jit
def _layer_norm_bwd_reduce_kernel(
    part_ptr,  # (G, 2, D) fp32 partial sums
    dw_ptr,  # (D,) weight's dtype
    db_ptr,  # (D,) bias's dtype
    G, D,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_ok = cols < D
    dw = sum_partials(part_ptr, 0, G, D, cols, col_ok, 2, BLOCK_G, BLOCK_N)
    tl.store(dw_ptr + cols, dw.to(dw_ptr.dtype.element_ty), mask=col_ok)
    db = sum_partials(part_ptr, 1, G, D, cols, col_ok, 2, BLOCK_G, BLOCK_N)
    tl.store(db_ptr + cols, db.to(db_ptr.dtype.element_ty), mask=col_ok)


def _fwd_triton(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    M, D = x.shape
    x = unit_last_stride(x)
    y = torch.empty((M, D), device=x.device, dtype=x.dtype)
    mean = torch.empty((M,), device=x.device, dtype=torch.float32)
    rstd = torch.empty((M,), device=x.device, dtype=torch.float32)
    if M == 0:
        return y, mean, rstd
    block_d, block_m, warps = _config(D, backward=False)
    _layer_norm_fwd_kernel[(triton.cdiv(M, block_m),)](
        x, weight if weight is not None else x, bias if bias is not None else x, y, mean, rstd,
        M, D, x.stride(0), eps,
        HAS_W=weight is not None, HAS_B=bias is not None, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )
    return y, mean, rstd


def _bwd_triton(
    dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
    db_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    M, D = x.shape
    x, dy = unit_last_stride(x), unit_last_stride(dy)
    dx = torch.empty((M, D), device=x.device, dtype=x.dtype)
    dw = torch.empty((D,), device=x.device, dtype=weight.dtype if weight is not None else x.dtype)
    db = torch.empty((D,), device=x.device, dtype=db_dtype)
    if M == 0:
        return dx, dw.zero_(), db.zero_()
    block_d, block_m, warps = _config(D, backward=True)
    if x.device.type == "cuda":
        programs = _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
        programs *= _BWD_PROGRAMS_PER_SM
    else:
        programs = _INTERPRET_BWD_PROGRAMS
    # Each program owns a whole number of BLOCK_M steps; G shrinks when there are few rows.
    rows_per_prog = triton.cdiv(triton.cdiv(M, programs), block_m) * block_m
    G = triton.cdiv(M, rows_per_prog)
    partials = torch.empty((G, 2, D), device=x.device, dtype=torch.float32)
    _layer_norm_bwd_kernel[(G,)](
        dy, x, weight if weight is not None else x, mean, rstd, dx, partials,
        M, D, dy.stride(0), x.stride(0), rows_per_prog,
        HAS_W=weight is not None, BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )
    # All G partial rows of a column slice in one step when G <= 512: a few dozen programs each do
    # one L2 round trip (the partials were just written), instead of a long serial walk over G.
    block_g = min(triton.next_power_of_2(G), _REDUCE_MAX_G)
    block_n = min(max(16, _REDUCE_TILE // block_g), max(16, triton.next_power_of_2(D)))
    _layer_norm_bwd_reduce_kernel[(triton.cdiv(D, block_n),)](
        partials, dw, db, G, D, BLOCK_G=block_g, BLOCK_N=block_n, num_warps=8,
    )
    return dx, dw, db


@torch.library.custom_op("maws_kernels::layer_norm_fwd", mutates_args=())
def _layer_norm_fwd_op(
    x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor], eps: float
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(M, D) x -> y (M, D) in x's dtype, mean (M,) fp32, rstd (M,) fp32."""
    return _fwd_triton(x, weight, bias, eps)


@_layer_norm_fwd_op.register_fake
def _(x, weight, bias, eps):
    M = x.shape[0]
    return x.new_empty(x.shape), x.new_empty((M,), dtype=torch.float32), x.new_empty((M,), dtype=torch.float32)


@torch.library.custom_op("maws_kernels::layer_norm_bwd", mutates_args=())
def _layer_norm_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, weight: Optional[torch.Tensor], mean: torch.Tensor, rstd: torch.Tensor,
    db_dtype: torch.dtype,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (M, D) in x's dtype, dweight (D,) in weight's dtype (x's if None), dbias (D,) in db_dtype."""
    return _bwd_triton(dy, x, weight, mean, rstd, db_dtype)


@_layer_norm_bwd_op.register_fake
def _(dy, x, weight, mean, rstd, db_dtype):
    D = x.shape[1]
    w_dtype = weight.dtype if weight is not None else x.dtype
    return x.new_empty(x.shape), x.new_empty((D,), dtype=w_dtype), x.new_empty((D,), dtype=db_dtype)


def _setup_context(ctx, inputs, output):
    x, weight, bias, eps = inputs
    _, mean, rstd = output
    ctx.save_for_backward(x, weight, mean, rstd)
    ctx.has_w = weight is not None
    ctx.bias_dtype = bias.dtype if bias is not None else None


def _backward(ctx, dy, _dmean, _drstd):
    x, weight, mean, rstd = ctx.saved_tensors
    db_dtype = ctx.bias_dtype if ctx.bias_dtype is not None else x.dtype
    dx, dw, db = _layer_norm_bwd_op(dy, x, weight, mean, rstd, db_dtype)
    return dx, dw if ctx.has_w else None, db if ctx.bias_dtype is not None else None, None


_layer_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x: torch.Tensor, weight: Optional[torch.Tensor], bias: Optional[torch.Tensor]) -> int:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"layer_norm: x must be (..., D) with D >= 1, got shape {tuple(x.shape)}")
    D = x.shape[-1]
    for name, t in (("weight", weight), ("bias", bias)):
        if t is None:
            continue
        if t.shape != (D,):
            raise ValueError(f"layer_norm: {name} must have shape ({D},) to match x's last dim, got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"layer_norm: {name} is on {t.device} but x is on {x.device}")
    return D


def layer_norm(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float = 1e-6,
    backend: str | None = None,
) -> torch.Tensor:
    """LayerNorm over the last dim, as ``F.layer_norm(x, (D,), weight, bias, eps)``, fused fwd + bwd.

    Differentiable in ``x``, ``weight`` and ``bias``; works under ``torch.compile(fullgraph=True)``.

    Args:
        x: (..., D) input, any leading shape and strides; fp32 / fp16 / bf16 for the Triton backend.
        weight: (D,) scale, or None for no scale.
        bias: (D,) shift, or None for no shift.
        eps: added to the variance (the MAE / ViT recipe uses 1e-6).
        backend: "triton" | "torch" | None (see maws_kernels._backend); "torch" is ``F.layer_norm``.

    Returns:
        (..., D) tensor in x's dtype (statistics are computed in fp32).

    Raises:
        ValueError: shapes or devices of x / weight / bias do not match, or (Triton) an unsupported
            dtype or D > 16384.
    """
    D = _check(x, weight, bias)
    backend = resolve_backend("layer_norm", backend, _IMPLEMENTED, x.device)
    if backend == "torch":
        return F.layer_norm(x, (D,), weight, bias, eps)
    if x.dtype not in (torch.float32, torch.float16, torch.bfloat16):
        raise ValueError(f"layer_norm: the triton backend takes fp32/fp16/bf16 x, got {x.dtype}; use backend='torch'")
    if D > _MAX_D:
        raise ValueError(f"layer_norm: the triton backend keeps a row in registers and takes D <= {_MAX_D}, "
                         f"got D={D}; use backend='torch'")
    y, _, _ = _layer_norm_fwd_op(x.reshape(-1, D), weight, bias, float(eps))
    return y.view(x.shape)


def layer_norm_ref(
    x: torch.Tensor,
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float = 1e-6,
    upcast: bool = False,
) -> torch.Tensor:
    """Reference: ``F.layer_norm`` over the last dim; with ``upcast`` computed and returned in fp32."""
    if upcast:
        x = x.float()
        weight = weight.float() if weight is not None else None
        bias = bias.float() if bias is not None else None
    return F.layer_norm(x, (x.shape[-1],), weight, bias, eps)


# --- compile scenarios: what maws_kernels.compile_check compiles (see _scenarios.py) ---------------
def _compile_run(dev: str, M: int, D: int, act: torch.dtype, data: torch.dtype, affine: bool) -> None:
    x = empty((M, D), act, dev)
    w, b = (empty((D,), data, dev), empty((D,), data, dev)) if affine else (None, None)
    y, mean, rstd = op_impl(_layer_norm_fwd_op)(x, w, b, 1e-6)
    op_impl(_layer_norm_bwd_op)(y, x, w, mean, rstd, data if affine else act)


def compile_scenarios(shapes: CompileShapes) -> Iterator[Scenario]:
    """Forward + backward (and its reduction) at the MAE encoder's and decoder's token rows and widths,
    with and without weight and bias; variants: rows as wide as _MAX_D, and odd widths."""
    for s in shapes.steps():
        for where, M, D in s.blocks()[:2]:  # enc, dec
            for affine in (True, False):
                yield Scenario(f"{s.tag} {where} M={M} D={D} {s.prec}{'' if affine else ' no-affine'}", _compile_run,
                               (M, D, s.act, s.data, affine))
    for prec in shapes.precisions if shapes.variants else ():
        for D in (8192, 16384, 1000, 100, 1):
            yield Scenario(f"wide/odd M=50432 D={D} {prec}", _compile_run, (50432, D, *PRECISIONS[prec], True))
