"""Residual add + LayerNorm in one pass (the pre-norm ViT block's ``x = x + branch; h = norm(x)``),
with the bias of the Linear that produced the branch folded in: forward and backward in Triton.

Forward, per row of D values, all math in fp32:
``s = residual + x + x_bias`` rounded ONCE to its storage dtype (residual's, else x's) and stored;
``y = (s - mean) * rstd * weight + bias`` with ``mean`` / biased variance of the ROUNDED s and
``rstd = 1 / sqrt(var + eps)`` -- so y equals ``F.layer_norm(s_stored)`` and the backward, which
re-reads the stored s, matches the forward's statistics exactly. Each program holds ``BLOCK_M`` whole
rows in registers; x, residual and the parameters are read once, s, y and mean / rstd (M,) fp32 are
written once. Only s, weight, mean and rstd are saved for the backward (not x or residual).

Backward, given ``dy`` (grad of y) and ``ds`` (grad of s from its other consumers, e.g. the next
block's residual; absent when s is not used elsewhere). With ``xhat = (s - mean) * rstd`` and
``g = dy * weight``: ``g_total = rstd * (g - xhat * mean(g * xhat) - mean(g)) + ds``. Then
``dx = dresidual = g_total`` (one tensor when x and residual share a dtype), ``dx_bias = sum_rows(g_total)``,
``dweight = sum_rows(dy * xhat)``, ``dbias = sum_rows(dy)``. The column sums use layer_norm's scheme:
G persistent programs each walk a contiguous group of rows, keep fp32 partials in registers and write
one (K, D) slab (K = the sums actually needed, <= 3); a small kernel adds the (G, K, D) slabs in a
fixed order. No atomics: deterministic.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from maws_kernels._triton import tl, triton

from maws_kernels._backend import resolve_backend, unit_last_stride
from maws_kernels._scenarios import CompileShapes, Scenario, empty, op_impl
# Shared policy with layer_norm (same row-in-registers limit, same reduction shape); _num_sms is
# looked up as this module's global at launch time, so compile_check can answer it for a target.
from maws_kernels.layer_norm import (_BWD_PROGRAMS_PER_SM, _MAX_D, _REDUCE_MAX_G, _REDUCE_TILE, _num_sms,
                                     load_norm_weight, normalize_rows, normalize_rows_bwd, sum_partials)

_IMPLEMENTED = ("triton", "torch")
_TILE_ELEMS = 4096  # rows * BLOCK_D per forward program step, as layer_norm
_TILE_ELEMS_BWD = 2048  # backward: half, as it holds ~7 arrays (dy, s, ds, 3 partial sums, dx)
_MAX_ROWS = 32  # rows per program for narrow D (tiny widths only)
_INTERPRET_BWD_PROGRAMS = 4  # interpreter: a few programs, so the multi-program path is still tested
_LOWP = (torch.float16, torch.bfloat16)
_FLOATS = (torch.float32, torch.float16, torch.bfloat16)


def _config(D: int, backward: bool) -> tuple[int, int, int]:
    """(BLOCK_D, BLOCK_M, num_warps) for rows of width D.

    As layer_norm's: a whole row in registers, ~_TILE_ELEMS values per forward step; the forward
    holds x, residual and s, with layer_norm's warps. The backward holds dy, s, ds and up to three
    fp32 partial sums, so it moves half the values per step (8 per thread at 8 warps) and takes 16
    warps from 4096-wide blocks on. Compiled for sm_90 (Triton 3.7, every model-zoo width, fp32,
    bf16 and bf16 with an fp32 stream and parameters): forward 40-96 registers, backward 64-112
    (<= 128: 2 programs of 8 warps fit an SM; at BLOCK_D = 4096 one 16-warp program does),
    reduction 64, no spills, 128-bit loads and stores of the (M, D) tensors.
    """
    block_d = max(16, triton.next_power_of_2(D))
    block_m = max(1, min(_MAX_ROWS, (_TILE_ELEMS_BWD if backward else _TILE_ELEMS) // block_d))
    if backward:
        warps = 8 if block_d <= 2048 else 16
    else:
        warps = 4 if block_d <= 1024 else 8 if block_d <= 4096 else 16
    # Tiny tiles (D < 128) gain nothing from more warps than 8 values per thread would need.
    warps = max(1, min(warps, block_m * block_d // 256))
    return block_d, block_m, warps


@triton.jit
def _add_layer_norm_fwd_kernel(
    x_ptr,  # (M, D) row stride stride_x, unit column stride: the branch output
    r_ptr,  # (M, D) row stride stride_r, unit column stride, or a dummy when HAS_R is False
    xb_ptr,  # (D,) the branch Linear's bias, or a dummy when HAS_XB is False
    w_ptr,  # (D,) or a dummy when HAS_W is False
    b_ptr,  # (D,) or a dummy when HAS_B is False
    s_ptr,  # (M, D) contiguous, residual's dtype (x's without residual): the new residual stream
    y_ptr,  # (M, D) contiguous, x's dtype
    mean_ptr,  # (M,) fp32
    rstd_ptr,  # (M,) fp32
    M, D, stride_x, stride_r, eps,
    HAS_R: tl.constexpr,
    HAS_XB: tl.constexpr,
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

    s = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_XB:
        xb = tl.load(xb_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        s += xb[None, :]
    if HAS_R:
        s += tl.load(r_ptr + rows64[:, None] * stride_r + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    # Round s to its storage dtype first: the statistics below (and the backward, which re-reads
    # the stored s) then see exactly the tensor the next block reads.
    s_st = s.to(s_ptr.dtype.element_ty)
    tl.store(s_ptr + rows64[:, None] * D + cols[None, :], s_st, mask=mask)
    s = s_st.to(tl.float32)

    y, mean, rstd = normalize_rows(s, mask, cols, col_ok, D, eps, w_ptr, b_ptr, HAS_W, HAS_B)  # padding lanes are 0
    tl.store(y_ptr + rows64[:, None] * D + cols[None, :], y.to(y_ptr.dtype.element_ty), mask=mask)
    tl.store(mean_ptr + rows, mean, mask=row_ok)
    tl.store(rstd_ptr + rows, rstd, mask=row_ok)


@triton.jit
def _add_layer_norm_bwd_kernel(
    dy_ptr,  # (M, D) row stride stride_dy, unit column stride
    ds_ptr,  # (M, D) row stride stride_ds, unit column stride, or a dummy when HAS_DS is False
    s_ptr,  # (M, D) row stride stride_s, unit column stride: the stored forward s
    w_ptr,  # (D,) or a dummy when DW_ROW < 0 (no weight)
    mean_ptr,  # (M,) fp32
    rstd_ptr,  # (M,) fp32
    dx_ptr,  # (M, D) contiguous, x's dtype (also dresidual when the dtypes match)
    dr_ptr,  # (M, D) contiguous, residual's dtype, or a dummy when HAS_DR is False
    part_ptr,  # (G, K, D) fp32 per-program partial column sums, rows DW_ROW / DB_ROW / DXB_ROW
    M, D, stride_dy, stride_ds, stride_s, rows_per_prog,
    HAS_DS: tl.constexpr,
    HAS_DR: tl.constexpr,
    K: tl.constexpr,
    DW_ROW: tl.constexpr,  # slab row of sum dy * xhat, -1: no weight (g = dy, no dweight)
    DB_ROW: tl.constexpr,  # slab row of sum dy, -1: no bias
    DXB_ROW: tl.constexpr,  # slab row of sum g_total, -1: no x_bias
    BLOCK_M: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid = tl.program_id(0)
    cols = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    col_ok = cols < D
    w = load_norm_weight(w_ptr, cols, col_ok, DW_ROW >= 0)
    if DW_ROW >= 0:
        dw_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    # 2-D accumulators: the sum over rows is done once at the end, not in every step.
    if DB_ROW >= 0:
        db_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    if DXB_ROW >= 0:
        dxb_acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    for r0 in range(row_start, row_end, BLOCK_M):
        rows = r0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
        row_ok = rows < row_end
        mask = row_ok[:, None] & col_ok[None, :]
        rows64 = rows.to(tl.int64)
        s = tl.load(s_ptr + rows64[:, None] * stride_s + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        dy = tl.load(dy_ptr + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        mean = tl.load(mean_ptr + rows, mask=row_ok, other=0.0)
        rstd = tl.load(rstd_ptr + rows, mask=row_ok, other=0.0)
        # Padding columns have xhat = -mean * rstd but dy = 0, so they add nothing to c1, c2 or any
        # column sum (their dx is masked at the stores and never summed into a stored column);
        # padding rows load rstd = 0, so their dx is 0 and adds nothing to the x_bias sum.
        dx, xhat = normalize_rows_bwd(dy, s, mean, rstd, w, D, DW_ROW >= 0)
        if HAS_DS:
            dx += tl.load(ds_ptr + rows64[:, None] * stride_ds + cols[None, :], mask=mask, other=0.0).to(tl.float32)
        tl.store(dx_ptr + rows64[:, None] * D + cols[None, :], dx.to(dx_ptr.dtype.element_ty), mask=mask)
        if HAS_DR:  # residual in another dtype (fp32 stream, bf16 branch): the same values, stored twice
            tl.store(dr_ptr + rows64[:, None] * D + cols[None, :], dx.to(dr_ptr.dtype.element_ty), mask=mask)
        if DW_ROW >= 0:
            dw_acc += dy * xhat
        if DB_ROW >= 0:
            db_acc += dy
        if DXB_ROW >= 0:
            dxb_acc += dx
    part = part_ptr + pid.to(tl.int64) * K * D
    if DW_ROW >= 0:
        tl.store(part + DW_ROW * D + cols, tl.sum(dw_acc, axis=0), mask=col_ok)
    if DB_ROW >= 0:
        tl.store(part + DB_ROW * D + cols, tl.sum(db_acc, axis=0), mask=col_ok)
    if DXB_ROW >= 0:
        tl.store(part + DXB_ROW * D + cols, tl.sum(dxb_acc, axis=0), mask=col_ok)


@triton.jit
def _add_layer_norm_bwd_reduce_kernel(
    part_ptr,  # (G, K, D) fp32 partial sums
    dw_ptr,  # (D,) weight's dtype, or a dummy when DW_ROW < 0
    db_ptr,  # (D,) bias's dtype, or a dummy when DB_ROW < 0
    dxb_ptr,  # (D,) x_bias's dtype, or a dummy when DXB_ROW < 0
    G, D,
    K: tl.constexpr,
    DW_ROW: tl.constexpr,
    DB_ROW: tl.constexpr,
    DXB_ROW: tl.constexpr,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_ok = cols < D
    # One sum at a time: a single (BLOCK_G, BLOCK_N) accumulator is live, as in layer_norm's reduction.
    if DW_ROW >= 0:
        dw = sum_partials(part_ptr, DW_ROW, G, D, cols, col_ok, K, BLOCK_G, BLOCK_N)
        tl.store(dw_ptr + cols, dw.to(dw_ptr.dtype.element_ty), mask=col_ok)
    if DB_ROW >= 0:
        db = sum_partials(part_ptr, DB_ROW, G, D, cols, col_ok, K, BLOCK_G, BLOCK_N)
        tl.store(db_ptr + cols, db.to(db_ptr.dtype.element_ty), mask=col_ok)
    if DXB_ROW >= 0:
        dxb = sum_partials(part_ptr, DXB_ROW, G, D, cols, col_ok, K, BLOCK_G, BLOCK_N)
        tl.store(dxb_ptr + cols, dxb.to(dxb_ptr.dtype.element_ty), mask=col_ok)


def _fwd_triton(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    x_bias: Optional[torch.Tensor], eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    shape, D = x.shape, x.shape[-1]
    # (..., D) -> (M, D): a view for the usual layouts (kept row strides), a copy otherwise
    x = unit_last_stride(x).reshape(-1, D)
    residual = unit_last_stride(residual).reshape(-1, D) if residual is not None else None
    M = x.shape[0]
    s_dtype = residual.dtype if residual is not None else x.dtype
    y = torch.empty(shape, device=x.device, dtype=x.dtype)
    s = torch.empty(shape, device=x.device, dtype=s_dtype)
    mean = torch.empty((M,), device=x.device, dtype=torch.float32)
    rstd = torch.empty((M,), device=x.device, dtype=torch.float32)
    if M == 0:
        return y, s, mean, rstd
    block_d, block_m, warps = _config(D, backward=False)
    _add_layer_norm_fwd_kernel[(triton.cdiv(M, block_m),)](
        x, residual if residual is not None else x, x_bias if x_bias is not None else x,
        weight if weight is not None else x, bias if bias is not None else x, s, y, mean, rstd,
        M, D, x.stride(0), residual.stride(0) if residual is not None else 0, eps,
        HAS_R=residual is not None, HAS_XB=x_bias is not None, HAS_W=weight is not None, HAS_B=bias is not None,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )
    return y, s, mean, rstd


def _bwd_triton(
    dy: torch.Tensor, ds: Optional[torch.Tensor], s: torch.Tensor, weight: Optional[torch.Tensor],
    mean: torch.Tensor, rstd: torch.Tensor, dx_dtype: torch.dtype, dr_dtype: Optional[torch.dtype],
    db_dtype: Optional[torch.dtype], dxb_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    shape, D = s.shape, s.shape[-1]
    dev = s.device
    s, dy = unit_last_stride(s).reshape(-1, D), unit_last_stride(dy).reshape(-1, D)
    ds = unit_last_stride(ds).reshape(-1, D) if ds is not None else None
    M = s.shape[0]
    dx = torch.empty(shape, device=dev, dtype=dx_dtype)
    # Outputs that are not needed are (0,)-sized placeholders (a custom op returns no None, and
    # its outputs may not alias each other, so each is its own).
    def out(shape, dtype):
        return torch.empty(shape if dtype is not None else (0,), device=dev, dtype=dtype or dx_dtype)

    dr = out(shape, dr_dtype)
    dw = out((D,), weight.dtype if weight is not None else None)
    db = out((D,), db_dtype)
    dxb = out((D,), dxb_dtype)
    if M == 0:
        for t in (dw, db, dxb):
            t.zero_()
        return dx, dr, dw, db, dxb
    # Rows of the (G, K, D) partial slabs: only the column sums that have an output.
    slab = iter(range(3))
    dw_row = next(slab) if weight is not None else -1
    db_row = next(slab) if db_dtype is not None else -1
    dxb_row = next(slab) if dxb_dtype is not None else -1
    K = (dw_row >= 0) + (db_row >= 0) + (dxb_row >= 0)
    block_d, block_m, warps = _config(D, backward=True)
    if dev.type == "cuda":
        programs = _num_sms(dev.index if dev.index is not None else torch.cuda.current_device())
        programs *= _BWD_PROGRAMS_PER_SM
    else:
        programs = _INTERPRET_BWD_PROGRAMS
    # Each program owns a whole number of BLOCK_M steps; G shrinks when there are few rows.
    rows_per_prog = triton.cdiv(triton.cdiv(M, programs), block_m) * block_m
    G = triton.cdiv(M, rows_per_prog)
    partials = torch.empty((G, K, D), device=dev, dtype=torch.float32)
    _add_layer_norm_bwd_kernel[(G,)](
        dy, ds if ds is not None else dy, s, weight if weight is not None else s, mean, rstd, dx,
        dr if dr_dtype is not None else dx, partials,
        M, D, dy.stride(0), ds.stride(0) if ds is not None else 0, s.stride(0), rows_per_prog,
        HAS_DS=ds is not None, HAS_DR=dr_dtype is not None, K=K, DW_ROW=dw_row, DB_ROW=db_row, DXB_ROW=dxb_row,
        BLOCK_M=block_m, BLOCK_D=block_d, num_warps=warps,
    )
    if K:
        # As layer_norm: all G partial rows of a column slice in one step when G <= 512.
        block_g = min(triton.next_power_of_2(G), _REDUCE_MAX_G)
        block_n = min(max(16, _REDUCE_TILE // block_g), max(16, triton.next_power_of_2(D)))
        _add_layer_norm_bwd_reduce_kernel[(triton.cdiv(D, block_n),)](
            partials, dw, db, dxb, G, D, K=K, DW_ROW=dw_row, DB_ROW=db_row, DXB_ROW=dxb_row,
            BLOCK_G=block_g, BLOCK_N=block_n, num_warps=8,
        )
    return dx, dr, dw, db, dxb


@torch.library.custom_op("maws_kernels::add_layer_norm_fwd", mutates_args=())
def _add_layer_norm_fwd_op(
    x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor], bias: Optional[torch.Tensor],
    x_bias: Optional[torch.Tensor], eps: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """(..., D) x -> y (..., D) in x's dtype, s (..., D) in residual's dtype (x's if None), mean, rstd (M,) fp32.

    Takes x's own shape (not an (M, D) view) so that the gradient it returns for x and residual is
    one tensor handed straight to both: behind per-input view nodes, autograd would turn it into two
    views of one storage, which leaf ``.grad`` accumulation then adds into twice.
    """
    return _fwd_triton(x, residual, weight, bias, x_bias, eps)


@_add_layer_norm_fwd_op.register_fake
def _(x, residual, weight, bias, x_bias, eps):
    M = x.numel() // x.shape[-1]
    s_dtype = residual.dtype if residual is not None else x.dtype
    stats = (x.new_empty((M,), dtype=torch.float32), x.new_empty((M,), dtype=torch.float32))
    return (x.new_empty(x.shape), x.new_empty(x.shape, dtype=s_dtype)) + stats


@torch.library.custom_op("maws_kernels::add_layer_norm_bwd", mutates_args=())
def _add_layer_norm_bwd_op(
    dy: torch.Tensor, ds: Optional[torch.Tensor], s: torch.Tensor, weight: Optional[torch.Tensor],
    mean: torch.Tensor, rstd: torch.Tensor, dx_dtype: torch.dtype, dr_dtype: Optional[torch.dtype],
    db_dtype: Optional[torch.dtype], dxb_dtype: Optional[torch.dtype],
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """dx (..., D) (s's shape) in dx_dtype; dresidual in dr_dtype, only when given (else dx is dresidual);
    dweight / dbias / dx_bias (D,) where weight / db_dtype / dxb_dtype are given. Absent outputs are (0,)."""
    return _bwd_triton(dy, ds, s, weight, mean, rstd, dx_dtype, dr_dtype, db_dtype, dxb_dtype)


@_add_layer_norm_bwd_op.register_fake
def _(dy, ds, s, weight, mean, rstd, dx_dtype, dr_dtype, db_dtype, dxb_dtype):
    D = s.shape[-1]

    def out(shape, dtype):
        return s.new_empty(shape if dtype is not None else (0,), dtype=dtype or dx_dtype)

    return (out(s.shape, dx_dtype), out(s.shape, dr_dtype), out((D,), weight.dtype if weight is not None else None),
            out((D,), db_dtype), out((D,), dxb_dtype))


def _setup_context(ctx, inputs, output):
    x, residual, weight, bias, x_bias, eps = inputs
    _, s, mean, rstd = output
    ctx.save_for_backward(s, weight, mean, rstd)
    ctx.x_dtype = x.dtype
    ctx.has_r = residual is not None
    # dresidual is its own tensor only when residual's dtype differs from x's (fp32 stream, bf16 branch)
    ctx.dr_dtype = residual.dtype if residual is not None and residual.dtype != x.dtype else None
    ctx.db_dtype = bias.dtype if bias is not None else None
    ctx.dxb_dtype = x_bias.dtype if x_bias is not None else None
    # An unused s (or y) then gets None instead of a zero tensor the backward would have to read.
    ctx.set_materialize_grads(False)


def _backward(ctx, dy, ds, _dmean, _drstd):
    s, weight, mean, rstd = ctx.saved_tensors
    if dy is None and ds is None:
        return None, None, None, None, None, None
    if dy is None:  # only s is used downstream (rare): the LayerNorm part contributes nothing
        dy = torch.zeros(s.shape, device=s.device, dtype=ctx.x_dtype)
    dx, dr, dw, db, dxb = _add_layer_norm_bwd_op(dy, ds, s, weight, mean, rstd, ctx.x_dtype, ctx.dr_dtype,
                                                 ctx.db_dtype, ctx.dxb_dtype)
    dres = (dr if ctx.dr_dtype is not None else dx) if ctx.has_r else None
    return (dx, dres, dw if weight is not None else None, db if ctx.db_dtype is not None else None,
            dxb if ctx.dxb_dtype is not None else None, None)


_add_layer_norm_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x: torch.Tensor, residual: Optional[torch.Tensor], weight: Optional[torch.Tensor],
           bias: Optional[torch.Tensor], x_bias: Optional[torch.Tensor]) -> int:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"add_layer_norm: x must be (..., D) with D >= 1, got shape {tuple(x.shape)}")
    D = x.shape[-1]
    if residual is not None:
        if residual.shape != x.shape:
            raise ValueError(f"add_layer_norm: residual must have x's shape {tuple(x.shape)}, got "
                             f"{tuple(residual.shape)} (no broadcasting)")
        if residual.device != x.device:
            raise ValueError(f"add_layer_norm: residual is on {residual.device} but x is on {x.device}")
    for name, t in (("weight", weight), ("bias", bias), ("x_bias", x_bias)):
        if t is None:
            continue
        if t.shape != (D,):
            raise ValueError(f"add_layer_norm: {name} must have shape ({D},) to match x's last dim, "
                             f"got {tuple(t.shape)}")
        if t.device != x.device:
            raise ValueError(f"add_layer_norm: {name} is on {t.device} but x is on {x.device}")
    return D


def _ln_param(p: Optional[torch.Tensor], s_dtype: torch.dtype) -> Optional[torch.Tensor]:
    """``p`` as F.layer_norm takes it for input dtype ``s_dtype``: fp32 parameters may go with an fp16 /
    bf16 input (torch's mixed-dtype kernels), anything else is cast (differentiably)."""
    if p is None or p.dtype == s_dtype or (p.dtype == torch.float32 and s_dtype in _LOWP):
        return p
    return p.to(s_dtype)


def _add_layer_norm_torch(x, residual, weight, bias, eps, x_bias):
    """The eager composition: bias add, residual add, one rounding to s's dtype, F.layer_norm."""
    s_dtype = residual.dtype if residual is not None else x.dtype
    s = x + x_bias if x_bias is not None else x
    s = (residual + s if residual is not None else s).to(s_dtype)
    # CUDA autocast runs layer_norm in fp32 and returns fp32; y is x's dtype here, as the kernel's.
    with torch.autocast(s.device.type, enabled=False):
        y = F.layer_norm(s, (s.shape[-1],), _ln_param(weight, s_dtype), _ln_param(bias, s_dtype), eps)
    return y.to(x.dtype), s


def add_layer_norm(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float = 1e-6,
    x_bias: Optional[torch.Tensor] = None,
    backend: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Residual add + LayerNorm over the last dim, fused fwd + bwd: ``s = residual + x + x_bias``,
    ``y = F.layer_norm(s, (D,), weight, bias, eps)``.

    s is rounded to its storage dtype before the statistics are taken, so y is exactly the LayerNorm
    of the returned s. Differentiable in every tensor argument; works under
    ``torch.compile(fullgraph=True)``. When x and residual share a dtype their gradients are one tensor.

    Args:
        x: (..., D) branch output (e.g. the attention / MLP output projection WITHOUT its bias), any
            leading shape and strides; fp32 / fp16 / bf16 for the Triton backend.
        residual: x's shape, the residual stream; may be another float dtype than x (an fp32 stream
            with a bf16 branch). None: ``s = x (+ x_bias)``.
        weight: (D,) LayerNorm scale, or None for no scale.
        bias: (D,) LayerNorm shift, or None for no shift.
        eps: added to the variance (the MAE / ViT recipe uses 1e-6).
        x_bias: (D,) bias of the Linear that produced x, added here instead of in its GEMM, or None.
        backend: "triton" | "torch" | None (see maws_kernels._backend); "torch" is the eager
            composition of aten ops.

    Returns:
        (y, s): y (..., D) in x's dtype; s (..., D) in residual's dtype (x's when residual is None),
        the new residual stream. All arithmetic is fp32; weight / bias / x_bias may be fp32 with a
        bf16 x (autocast).

    Raises:
        ValueError: shapes or devices of the inputs do not match, or (Triton) an unsupported dtype or
            D > 16384.
    """
    D = _check(x, residual, weight, bias, x_bias)
    backend = resolve_backend("add_layer_norm", backend, _IMPLEMENTED, x.device)
    if backend == "torch":
        return _add_layer_norm_torch(x, residual, weight, bias, eps, x_bias)
    for name, t in (("x", x), ("residual", residual)):
        if t is not None and t.dtype not in _FLOATS:
            raise ValueError(f"add_layer_norm: the triton backend takes fp32/fp16/bf16 {name}, got {t.dtype}; "
                             "use backend='torch'")
    if D > _MAX_D:
        raise ValueError(f"add_layer_norm: the triton backend keeps a row in registers and takes D <= {_MAX_D}, "
                         f"got D={D}; use backend='torch'")
    y, s, _, _ = _add_layer_norm_fwd_op(x, residual, weight, bias, x_bias, float(eps))
    return y, s


def add_layer_norm_ref(
    x: torch.Tensor,
    residual: Optional[torch.Tensor],
    weight: Optional[torch.Tensor],
    bias: Optional[torch.Tensor],
    eps: float = 1e-6,
    x_bias: Optional[torch.Tensor] = None,
    upcast: bool = False,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Reference (y, s): ``s = (residual + x + x_bias).to(s dtype)``, ``y = F.layer_norm(s)`` in x's
    dtype; with ``upcast`` everything is computed and returned in fp32."""
    if upcast:
        x, residual, weight, bias, x_bias = (t.float() if t is not None else None
                                             for t in (x, residual, weight, bias, x_bias))
    return _add_layer_norm_torch(x, residual, weight, bias, eps, x_bias)


# --- compile scenarios: what maws_kernels.compile_check compiles (see _scenarios.py) ---------------
def _compile_run(dev: str, M: int, D: int, act: torch.dtype, data: torch.dtype, residual: bool, with_ds: bool) -> None:
    x = empty((M, D), act, dev)
    r = empty((M, D), act, dev) if residual else None
    w, b, xb = (empty((D,), data, dev) for _ in range(3))
    y, s, mean, rstd = op_impl(_add_layer_norm_fwd_op)(x, r, w, b, xb, 1e-6)
    op_impl(_add_layer_norm_bwd_op)(y, s if with_ds else None, s, w, mean, rstd, act, act if residual else None,
                                    data, data)


def compile_scenarios(shapes: CompileShapes) -> Iterator[Scenario]:
    """Forward + backward at the MAE encoder's and decoder's token rows and widths: with a residual and
    a gradient into the sum s (a block's first norm), without ds (the last), without a residual."""
    for s in shapes.steps():
        for where, M, D in s.blocks()[:2]:  # enc, dec
            for residual, with_ds in ((True, True), (True, False), (False, True)):
                flags = ("" if with_ds else " no-ds") if residual else " no-residual"
                yield Scenario(f"{s.tag} add-ln {where} M={M} D={D} {s.prec}{flags}", _compile_run,
                               (M, D, s.act, s.data, residual, with_ds))
