"""Fused bias add + exact (erf) GELU over the last dim: forward and backward in Triton.

``y = gelu(x + bias)`` with ``gelu(z) = z * Phi(z)``, ``Phi(z) = 0.5 * (1 + erf(z / sqrt(2)))`` the
normal CDF -- ``torch.nn.GELU()``'s default (``approximate="none"``), the MLP activation of ViT / MAE.
``x`` is the fc1 GEMM output without its bias (the GEMM runs bias-free so the add is fused here).

Forward: elementwise on a flat 2-D grid of (BLOCK_M, BLOCK_N) tiles; all math in fp32, ``y`` stored
in x's dtype. Only ``x`` and ``bias`` are saved for the backward: ``z`` is recomputed there, so no
(M, N) activation besides ``x`` stays alive between forward and backward.

Backward: ``dz = dy * gelu'(z)`` with ``gelu'(z) = Phi(z) + z * phi(z)``, ``phi(z) = exp(-z^2 / 2) /
sqrt(2 pi)`` the normal pdf; ``dx = dz`` in x's dtype and ``dbias = sum_rows(dz)``. The bias gradient
comes from the same pass: a fixed grid of G persistent programs each walks a contiguous group of
rows, column tile by column tile, accumulates fp32 partials in registers and writes one (N,) row of
a (G, N) slab; a small second kernel sums the slab in a fixed order. No atomics, so the result is
deterministic, and dz is never re-read from memory for the reduction. ``_FUSE_DBIAS = False``
instead lets torch sum the stored dx (``dx.float().sum(0)``), the path the benchmark compares against.
"""
from __future__ import annotations

from typing import Iterator, Optional

import torch
import torch.nn.functional as F
from maws_kernels._triton import tl, triton

from maws_kernels._backend import resolve_backend, unit_last_stride
from maws_kernels._grid import check_grid
from maws_kernels._scenarios import CompileShapes, Scenario, empty, op_impl
# _num_sms: a module global here too, so the compile check can stand in for it
from maws_kernels.layer_norm import _num_sms, sum_partials

_IMPLEMENTED = ("triton", "torch")
_FUSE_DBIAS = True  # dbias from the backward kernel's partials (False: torch sums dx afterwards)
_FWD_TILE = 4096  # elements per forward program: 32 per thread at 4 warps (4 x 16-byte bf16 loads)
_FWD_MAX_BLOCK_N = 1024  # columns per forward tile: one 16-byte bf16 vector per thread per row
_FWD_WARPS = 4
_BWD_TILE = 4096  # elements per backward step: 16 per thread at 8 warps, x + dy + fp32 partials
_BWD_MAX_BLOCK_N = 512  # columns per backward tile; the rows of a group stream through it
_BWD_WARPS = 8
_MAX_ROWS = 32  # rows per tile for narrow N (test widths only; MLP widths are >= 256)
_BWD_PROGRAMS_PER_SM = 2  # persistent backward programs per SM (8 warps each)
_INTERPRET_BWD_PROGRAMS = 4  # interpreter: a few programs, so the multi-program path is still tested
_REDUCE_TILE = 8192  # partial rows * columns per step of the reduction kernel (8 warps: 32 per thread)
_REDUCE_MAX_G = 512  # G up to this is summed in one step (G = 2 * 132 on an H100)

# Constants used inside the kernels must be constexpr globals.
_INV_SQRT2 = tl.constexpr(0.7071067811865476)  # 1 / sqrt(2)
_INV_SQRT_2PI = tl.constexpr(0.3989422804014327)  # 1 / sqrt(2 pi), the pdf's normaliser


def _config(N: int, tile: int, max_block_n: int, warps: int) -> tuple[int, int, int]:
    """(BLOCK_N, BLOCK_M, num_warps) for rows of width N and ``tile`` elements per program step.

    BLOCK_N is a power of two (>= 16, so fp32 and bf16 rows still get 16-byte vectors) capped at
    ``max_block_n``: rows of any width are tiled, none has to be resident. Rows fill the rest of
    the tile. ``warps`` is the count for full tiles (forward 4: 32 values per thread, one array
    live; backward 8: 16 per thread, as x, dy and the fp32 partial sums are live); tiny tiles get fewer.
    Compiled for sm_90 (Triton 3.7.1, every zoo MLP width, fp32 / bf16 / bf16 + fp32 bias): forward
    61-80 registers, backward 99-101 with the fused dbias (43-64 without), reduction 63; no spills,
    128-bit loads and stores of x, dy, y, dx.
    """
    block_n = min(max(16, triton.next_power_of_2(N)), max_block_n)
    block_m = max(1, min(_MAX_ROWS, tile // block_n))
    # Tiny tiles (N < 128) gain nothing from more warps than 8 values per thread would need.
    warps = max(1, min(warps, block_m * block_n // 256))
    return block_n, block_m, warps


@triton.jit
def _bias_gelu_fwd_kernel(
    x_ptr,  # (M, N) row stride stride_x, unit column stride
    b_ptr,  # (N,) contiguous, or a dummy when HAS_BIAS is False
    y_ptr,  # (M, N) contiguous, x's dtype
    M, N, stride_x,
    HAS_BIAS: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    # Row tiles on grid axis 0 (up to 2**31 - 1 programs), column tiles on axis 1 (N / BLOCK_N <= 16).
    rows = tl.program_id(0) * BLOCK_M + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    cols = tl.program_id(1) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_ok = cols < N
    mask = (rows < M)[:, None] & col_ok[None, :]
    rows64 = rows.to(tl.int64)  # M * N may exceed 2**31

    z = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
    if HAS_BIAS:
        # fp32 bias under autocast is added in fp32, never rounded to x's dtype first.
        b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        z = z + b[None, :]
    cdf = 0.5 * (1.0 + tl.math.erf(z * _INV_SQRT2))  # Phi(z), libdevice erff when compiled
    tl.store(y_ptr + rows64[:, None] * N + cols[None, :], (z * cdf).to(y_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _bias_gelu_bwd_kernel(
    dy_ptr,  # (M, N) row stride stride_dy, unit column stride
    x_ptr,  # (M, N) row stride stride_x, unit column stride
    b_ptr,  # (N,) contiguous, or a dummy when HAS_BIAS is False
    dx_ptr,  # (M, N) contiguous, x's dtype
    part_ptr,  # (G, N) fp32: per-program sum of dz over its rows; a dummy when COMPUTE_DB is False
    M, N, stride_dy, stride_x, rows_per_prog,
    HAS_BIAS: tl.constexpr,
    COMPUTE_DB: tl.constexpr,
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    pid = tl.program_id(0)
    row_start = pid * rows_per_prog
    row_end = tl.minimum(row_start + rows_per_prog, M)
    # Column tiles outside, rows inside: the partial sums of one tile stay in registers while the
    # program's rows stream through it, and x / dy are still read exactly once overall.
    for n0 in range(0, N, BLOCK_N):
        cols = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
        col_ok = cols < N
        if HAS_BIAS:
            b = tl.load(b_ptr + cols, mask=col_ok, other=0.0).to(tl.float32)
        # 2-D accumulator: the sum over its rows is done once per column tile, not in every step.
        acc = tl.zeros((BLOCK_M, BLOCK_N), dtype=tl.float32)
        for r0 in range(row_start, row_end, BLOCK_M):
            rows = r0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
            mask = (rows < row_end)[:, None] & col_ok[None, :]
            rows64 = rows.to(tl.int64)
            z = tl.load(x_ptr + rows64[:, None] * stride_x + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            dy = tl.load(dy_ptr + rows64[:, None] * stride_dy + cols[None, :], mask=mask, other=0.0).to(tl.float32)
            if HAS_BIAS:
                z = z + b[None, :]  # recomputed: z was never saved
            cdf = 0.5 * (1.0 + tl.math.erf(z * _INV_SQRT2))  # Phi(z)
            pdf = tl.exp(-0.5 * z * z) * _INV_SQRT_2PI  # phi(z)
            # Padding lanes load dy = 0, so dz = 0 there and they add nothing to the partials.
            dz = dy * (cdf + z * pdf)
            tl.store(dx_ptr + rows64[:, None] * N + cols[None, :], dz.to(dx_ptr.dtype.element_ty), mask=mask)
            if COMPUTE_DB:
                acc += dz
        if COMPUTE_DB:
            tl.store(part_ptr + pid.to(tl.int64) * N + cols, tl.sum(acc, axis=0), mask=col_ok)


@triton.jit
def _bias_gelu_bwd_reduce_kernel(
    part_ptr,  # (G, N) fp32 partial sums
    db_ptr,  # (N,) bias's dtype
    G, N,
    BLOCK_G: tl.constexpr,
    BLOCK_N: tl.constexpr,
):
    cols = tl.program_id(0) * BLOCK_N + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    col_ok = cols < N
    db = sum_partials(part_ptr, 0, G, N, cols, col_ok, 1, BLOCK_G, BLOCK_N)
    tl.store(db_ptr + cols, db.to(db_ptr.dtype.element_ty), mask=col_ok)


def _fwd_triton(x: torch.Tensor, bias: Optional[torch.Tensor]) -> torch.Tensor:
    M, N = x.shape
    x = unit_last_stride(x)
    y = torch.empty((M, N), device=x.device, dtype=x.dtype)
    if M == 0:
        return y
    block_n, block_m, warps = _config(N, _FWD_TILE, _FWD_MAX_BLOCK_N, _FWD_WARPS)
    b = bias.contiguous() if bias is not None else x  # (N,): a strided bias view is copied (N values)
    # Column tiles on axis y (at most 65535): rows wider than 65535 * BLOCK_N cannot launch.
    grid = check_grid("bias_gelu forward", (triton.cdiv(M, block_m), triton.cdiv(N, block_n)), f"x ({M}, {N})")
    _bias_gelu_fwd_kernel[grid](
        x, b, y, M, N, x.stride(0),
        HAS_BIAS=bias is not None, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    return y


def _bwd_triton(
    dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], need_dbias: bool, fuse_dbias: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    M, N = x.shape
    x, dy = unit_last_stride(x), unit_last_stride(dy)
    dx = torch.empty((M, N), device=x.device, dtype=x.dtype)
    need_dbias = need_dbias and bias is not None
    db = torch.empty((N,) if need_dbias else (0,), device=x.device, dtype=bias.dtype if need_dbias else x.dtype)
    if M == 0:
        return dx, db.zero_()
    fused = need_dbias and fuse_dbias
    block_n, block_m, warps = _config(N, _BWD_TILE, _BWD_MAX_BLOCK_N, _BWD_WARPS)
    if x.device.type == "cuda":
        programs = _num_sms(x.device.index if x.device.index is not None else torch.cuda.current_device())
        programs *= _BWD_PROGRAMS_PER_SM
    else:
        programs = _INTERPRET_BWD_PROGRAMS
    # Each program owns a whole number of BLOCK_M steps; G shrinks when there are few rows.
    rows_per_prog = triton.cdiv(triton.cdiv(M, programs), block_m) * block_m
    G = triton.cdiv(M, rows_per_prog)
    partials = torch.empty((G, N), device=x.device, dtype=torch.float32) if fused else dx
    b = bias.contiguous() if bias is not None else x
    _bias_gelu_bwd_kernel[(G,)](
        dy, x, b, dx, partials,
        M, N, dy.stride(0), x.stride(0), rows_per_prog,
        HAS_BIAS=bias is not None, COMPUTE_DB=fused, BLOCK_M=block_m, BLOCK_N=block_n, num_warps=warps,
    )
    if fused:
        # All G partial rows of a column slice in one step when G <= 512: a few dozen programs each
        # do one L2 round trip (the partials were just written), instead of a long serial walk over G.
        block_g = min(triton.next_power_of_2(G), _REDUCE_MAX_G)
        red_n = min(max(16, _REDUCE_TILE // block_g), max(16, triton.next_power_of_2(N)))
        _bias_gelu_bwd_reduce_kernel[(triton.cdiv(N, red_n),)](
            partials, db, G, N, BLOCK_G=block_g, BLOCK_N=red_n, num_warps=8,
        )
    elif need_dbias:
        # The unfused reference path: torch re-reads dx (rounded to x's dtype) to sum it.
        db = dx.float().sum(0).to(bias.dtype)
    return dx, db


@torch.library.custom_op("maws_kernels::bias_gelu_fwd", mutates_args=())
def _bias_gelu_fwd_op(x: torch.Tensor, bias: Optional[torch.Tensor], fuse_dbias: bool) -> torch.Tensor:
    """(M, N) x, (N,) bias -> y (M, N) in x's dtype. ``fuse_dbias`` only picks the backward's dbias path."""
    return _fwd_triton(x, bias)


@_bias_gelu_fwd_op.register_fake
def _(x, bias, fuse_dbias):
    return x.new_empty(x.shape)


@torch.library.custom_op("maws_kernels::bias_gelu_bwd", mutates_args=())
def _bias_gelu_bwd_op(
    dy: torch.Tensor, x: torch.Tensor, bias: Optional[torch.Tensor], need_dbias: bool, fuse_dbias: bool
) -> tuple[torch.Tensor, torch.Tensor]:
    """dx (M, N) in x's dtype; dbias (N,) in bias's dtype, or an empty (0,) tensor when not needed."""
    return _bwd_triton(dy, x, bias, need_dbias, fuse_dbias)


@_bias_gelu_bwd_op.register_fake
def _(dy, x, bias, need_dbias, fuse_dbias):
    need = need_dbias and bias is not None
    db = x.new_empty((x.shape[1],), dtype=bias.dtype) if need else x.new_empty((0,))
    return x.new_empty(x.shape), db


def _setup_context(ctx, inputs, output):
    x, bias, fuse_dbias = inputs
    ctx.save_for_backward(x, bias)  # z is recomputed from these; neither z nor y is kept
    ctx.fuse_dbias = fuse_dbias


def _backward(ctx, dy):
    x, bias = ctx.saved_tensors
    need_dbias = bias is not None and ctx.needs_input_grad[1]  # a frozen bias costs no reduction
    dx, db = _bias_gelu_bwd_op(dy, x, bias, need_dbias, ctx.fuse_dbias)
    return dx, db if need_dbias else None, None


_bias_gelu_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _check(x: torch.Tensor, bias: Optional[torch.Tensor]) -> int:
    if x.dim() < 1 or x.shape[-1] == 0:
        raise ValueError(f"bias_gelu: x must be (..., N) with N >= 1, got shape {tuple(x.shape)}")
    N = x.shape[-1]
    if bias is not None:
        if bias.shape != (N,):
            raise ValueError(f"bias_gelu: bias must have shape ({N},) to match x's last dim, got {tuple(bias.shape)}")
        if bias.device != x.device:
            raise ValueError(f"bias_gelu: bias is on {bias.device} but x is on {x.device}")
    return N


_TRITON_DTYPES = (torch.float32, torch.float16, torch.bfloat16)


def bias_gelu(x: torch.Tensor, bias: Optional[torch.Tensor] = None, backend: str | None = None) -> torch.Tensor:
    """Bias add + exact GELU, ``F.gelu(x + bias)`` (``approximate="none"``), fused fwd + bwd.

    The MLP activation after a bias-free fc1 GEMM. Differentiable in ``x`` and ``bias``; the
    backward recomputes ``x + bias`` and reduces the bias gradient in the same kernel. Works under
    ``torch.compile(fullgraph=True)``.

    Args:
        x: (..., N) fc1 output without its bias, any leading shape and strides; fp32 / fp16 / bf16
            for the Triton backend.
        bias: (N,) bias, or None for plain GELU. May be fp32 while x is bf16 / fp16 (autocast):
            it is added in fp32 and its gradient is returned in its own dtype.
        backend: "triton" | "torch" | None (see maws_kernels._backend); "torch" is ``F.gelu(x + bias)``.

    Returns:
        (..., N) tensor in x's dtype (the math is done in fp32).

    Raises:
        ValueError: bias's shape or device does not match x, or (Triton) x or bias has an
            unsupported dtype.
    """
    N = _check(x, bias)
    backend = resolve_backend("bias_gelu", backend, _IMPLEMENTED, x.device)
    if backend == "torch":
        z = x + bias if bias is not None else x
        return F.gelu(z).to(x.dtype)  # an fp32 bias promotes z: y stays in x's dtype
    for name, t in (("x", x), ("bias", bias)):
        if t is not None and t.dtype not in _TRITON_DTYPES:
            raise ValueError(f"bias_gelu: the triton backend takes fp32/fp16/bf16 {name}, got {t.dtype}; "
                             "use backend='torch'")
    y = _bias_gelu_fwd_op(x.reshape(-1, N), bias, _FUSE_DBIAS)
    return y.view(x.shape)


def bias_gelu_ref(x: torch.Tensor, bias: Optional[torch.Tensor] = None, upcast: bool = False) -> torch.Tensor:
    """Reference: ``F.gelu(x + bias)`` in x's dtype; with ``upcast`` computed and returned in fp32."""
    if upcast:
        x = x.float()
        bias = bias.float() if bias is not None else None
    z = x + bias if bias is not None else x
    return F.gelu(z).to(x.dtype)


# --- compile scenarios: what maws_kernels.compile_check compiles (see _scenarios.py) ---------------
def _compile_run(dev: str, M: int, N: int, act: torch.dtype, data: torch.dtype, has_bias: bool, fuse: bool) -> None:
    x = empty((M, N), act, dev)
    b = empty((N,), data, dev) if has_bias else None
    y = op_impl(_bias_gelu_fwd_op)(x, b, fuse)
    op_impl(_bias_gelu_bwd_op)(y, x, b, has_bias, fuse)


def compile_scenarios(shapes: CompileShapes) -> Iterator[Scenario]:
    """Forward + backward on the MLP hidden rows of the MAE encoder, decoder and WSP encoder: dbias
    fused, dbias by torch, no bias."""
    for s in shapes.steps():
        for where, M, D in s.blocks():
            N = int(s.model.mlp_ratio * D)
            for has_bias, fuse in ((True, True), (True, False), (False, True)):
                flags = ("" if fuse else " torch-dbias") if has_bias else " no-bias"
                yield Scenario(f"{s.tag} mlp {where} M={M} N={N} {s.prec}{flags}", _compile_run,
                               (M, N, s.act, s.data, has_bias, fuse))
