"""Flash attention (non-causal) in Triton: forward and backward, any sequence length, dense or varlen.

``o = softmax(scale * q @ k^T) @ v`` per (batch, head), never materialising the (N, N) scores.

Forward: one program per (Q tile, batch * head), on a 1-D grid (see :func:`_program`). The Q tile
stays in registers while K/V tiles stream past; an online softmax in fp32 (scores pre-scaled by
``scale * log2(e)`` so ``exp2`` does the exponentials) rescales an fp32 accumulator. Each row's
logsumexp (natural log, fp32) is stored for the backward.

Backward (no atomics, deterministic): one kernel over Q tiles computes ``delta = rowsum(dO * O)``
from the dO tile it holds, stores it, and walks every K/V tile for ``dQ = scale * dS K`` with
``dS = P * (dO V^T - delta)``; then one kernel over K/V tiles walks every Q tile, recomputes
``P = exp(S - lse)`` and accumulates ``dV = P^T dO`` and ``dK = scale * dS^T Q``. Recomputing P twice costs one extra QK^T matmul, which
is cheaper than fp32 atomics on dQ at ViT sequence lengths and keeps the result bitwise stable.

Ragged tails are masked in Q and K/V tiles alike, so any N works (50, 65, 197, 257, 1025, ...);
the head dim is padded to a power of two >= 16 with masked loads (D <= 128). The varlen form
packs sequences as (total_tokens, H, D) with ``cu_seqlens`` prefix sums and attends block-diagonally:
the same kernels with ``VARLEN`` set read each program's sequence start and length from
``cu_seqlens`` (batch stride 0, row offset ``start``).
"""
from __future__ import annotations

import os
from typing import Iterator, Optional

import torch
from maws_kernels._triton import tl, triton

from maws_kernels._backend import resolve_backend, unit_last_stride
from maws_kernels._grid import check_grid
from maws_kernels._scenarios import CompileShapes, Scenario, dt_name, empty, op_impl

_IMPLEMENTED = ("triton", "torch")
_MAX_D = 128  # the Q tile, accumulator and K/V tiles must stay in registers / shared memory
_DTYPES = (torch.float32, torch.float16, torch.bfloat16)
_LOG2E = 1.4426950408889634
_MIN_BLOCK = 16  # the smallest BLOCK_M / BLOCK_N of any config below: the launch grid is checked at it
# The interpreter computes tl.dot on bf16 operands wrongly (the repository's docs/ARCHITECTURE.md): there
# every dot operand is upcast to fp32 first. On a GPU the native fp16 / bf16 tensor-core dots are kept.
_INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


# --- configs ------------------------------------------------------------------------------------
def _configs(bm_bn_warps_stages) -> list[triton.Config]:
    return [triton.Config({"BLOCK_M": m, "BLOCK_N": n}, num_warps=w, num_stages=s) for m, n, w, s in bm_bn_warps_stages]


# Hopper (H100 / H200). Forward: a 64- or 128-row Q tile against 64-wide K/V tiles; 8 warps
# for 128 rows keep the fp32 accumulator at <= 64 registers per thread at D = 128.
_GPU_FWD_CONFIGS = _configs([(64, 64, 4, 2), (64, 64, 4, 3), (128, 64, 8, 2), (128, 64, 8, 3), (128, 32, 4, 3)])
# Backward: BLOCK_N is the resident K/V tile of the dK/dV kernel (the Q tile of the dQ kernel is
# BLOCK_M); two fp32 accumulators plus the resident tiles make 64-wide tiles the sweet spot.
_GPU_BWD_CONFIGS = _configs([(64, 64, 4, 2), (64, 64, 8, 2), (32, 64, 4, 2), (64, 128, 8, 2), (64, 32, 4, 3)])
if _INTERPRET:
    # The interpreter fails with several configs and costs ~1 ms per program: one small config,
    # which also puts several tiles (and a ragged tail) into the tests' tiny sequences.
    _FWD_CONFIGS = _BWD_CONFIGS = _configs([(16, 16, 4, 1)])
else:
    _FWD_CONFIGS, _BWD_CONFIGS = _GPU_FWD_CONFIGS, _GPU_BWD_CONFIGS


def _prune(fp32_config: triton.Config, backward: bool, resident_kv: bool):
    """An ``early_config_prune`` for one kernel's configs.

    fp32 inputs take IEEE fp32 dots (no TF32, so results match an fp32 reference), which Triton
    lowers to FMA loops, not tensor cores: those hold whole tiles per thread, so fp32 gets one small
    spill-free tile instead (a correctness path, not a fast one). At a 128-wide head block, 64 x 64
    tiles on 4 warps spill in the backward (two fp32 accumulators + two resident tiles): 8 warps.
    The dK/dV kernel (``resident_kv``) there keeps K/V tiles of at most 64 rows: at 128 rows its two
    fp32 (128, 128) accumulators alone take 128 registers per thread of 8 warps, and with the
    resident K and V it spills (sm_90, D = 80: 4-32 bytes at 255 registers, Triton 3.6 and 3.7).
    Compiled for sm_90 (Triton 3.6 and 3.7, the model zoo's head dims 32, 64, 80, 128), fp16 / bf16:
    forward 82-254 registers, backward 64-255, no spills.
    """
    def prune(configs, named_args, **kwargs):
        q = named_args.get("q_ptr")
        if q is not None and q.element_size() == 4:
            return [fp32_config]
        if backward and kwargs.get("BLOCK_D", 0) >= 128:
            configs = [c for c in configs if c.num_warps == 8 or c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] < 64 * 64]
            if resident_kv:
                configs = [c for c in configs if c.kwargs["BLOCK_N"] <= 64]
        return configs
    return prune


_FP32_CONFIG = triton.Config({"BLOCK_M": 16, "BLOCK_N": 16}, num_warps=4, num_stages=2)


def _tune(backward: bool, resident_kv: bool = False) -> dict:
    prune = _prune(_FP32_CONFIG, backward, resident_kv)
    return dict(key=["N", "BLOCK_D", "VARLEN"], prune_configs_by={"early_config_prune": prune})


# --- kernels ------------------------------------------------------------------------------------
# Shared set-up of the three kernels: every program is one (tile, batch * head) and reads whole
# (rows, head dim) tiles of one sequence of one head.
@triton.jit
def _program(cu_ptr, H, N, VARLEN: tl.constexpr, BLOCK: tl.constexpr):
    """``(tile, b, h, start, seqlen)`` of this program: batch and head as int64 (B * H * N * D may exceed
    2**31), and its sequence's first packed row and length (from cu_seqlens when VARLEN, else (0, N)).

    The grid is 1-D, ``(B * H * tiles,)`` with ``tiles = cdiv(N, BLOCK)`` (BLOCK: the tile's rows):
    batch * head on grid axis y would stop at CUDA's 65535 (20472 images x 16 decoder heads is
    327552), axis x takes 2**31 - 1. Program ``(b * H + h) * tiles + tile`` keeps the tiles of one
    head adjacent, so they run together and share its K / V (or Q / dO) in L2, as x-fastest
    (tiles, B * H) grids did.
    """
    # Unsigned divisions (every id is >= 0): compiled for sm_90 (Triton 3.6 and 3.7), the signed
    # form made the dQ kernel spill at D = 80 (32 x 64 tile, 4 warps: 168 registers and a stack frame).
    pid = tl.cast(tl.program_id(0), tl.uint32)
    tiles = tl.cast(tl.cdiv(N, BLOCK), tl.uint32)
    pid_bh = pid // tiles
    heads = tl.cast(H, tl.uint32)
    b = pid_bh // heads
    h = tl.cast(pid_bh - b * heads, tl.int32)
    b = tl.cast(b, tl.int32)
    pid = tl.cast(pid - pid_bh * tiles, tl.int32)
    if VARLEN:
        start = tl.load(cu_ptr + b)
        seqlen = tl.load(cu_ptr + b + 1) - start
    else:
        start = b * 0
        seqlen = N + b * 0
    return pid, b.to(tl.int64), h.to(tl.int64), start.to(tl.int64), seqlen


@triton.jit
def _head_ptr(ptr, b, h, sb, sh):
    """Token 0 of head (b, h) of a (B, H, N, D) tensor with strides (sb, sh, sn, 1); packed: sb = 0."""
    return ptr + b * sb + h * sh


@triton.jit
def _load_rows(base, rows, row_ok, sn, offs_d, D, UPCAST: tl.constexpr):
    """Tile (len(rows), BLOCK_D) at ``base + rows * sn``; zero where not ``row_ok`` and past ``D``; fp32 if UPCAST.

    Callers pass a head pointer with absolute int64 rows (``start + offs``) or a sequence pointer
    (``... + start * sn``) with int32 ``offs``, each load addressed as the kernel was written before
    these helpers: ptxas allocates registers differently for the two (sm_90, Triton 3.7: the backward
    kernels' resident tiles spilled at D = 80 when moved to the second form).
    """
    x = tl.load(base + rows[:, None] * sn + offs_d[None, :], mask=row_ok[:, None] & (offs_d < D)[None, :], other=0.0)
    if UPCAST:
        x = x.to(tl.float32)
    return x


@triton.jit
def _store_rows(base, x, rows, row_ok, sn, offs_d, D):
    """Store tile ``x`` at ``base + rows * sn`` in the pointer's dtype, masked like :func:`_load_rows`."""
    tl.store(base + rows[:, None] * sn + offs_d[None, :], x.to(base.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d < D)[None, :])


@triton.autotune(configs=_FWD_CONFIGS, **_tune(backward=False))
@triton.jit
def _attn_fwd_kernel(
    q_ptr,  # (B, H, N, D) strides (sqb, sqh, sqn, 1); varlen: (T, H, D) with sqb = 0, sqn = token stride
    k_ptr,  # same layout as q (own strides)
    v_ptr,  # same layout as q (own strides)
    o_ptr,  # same layout as q (own strides), q's dtype
    lse_ptr,  # (B, H, N) fp32 strides (slb, slh, 1); varlen: (H, T) with slb = 0
    cu_ptr,  # (B + 1,) int32 sequence starts when VARLEN, else unused
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sob, soh, son, slb, slh,
    H, N, D, qk_scale,  # N: the (max) sequence length; qk_scale = scale * log2(e)
    VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,  # dots in fp32 (interpreter, or fp32 inputs)
    DOT_PREC: tl.constexpr,  # "ieee" for fp32 inputs (no tf32), else "tf32" (ignored for 16-bit)
    BLOCK_M: tl.constexpr,
    BLOCK_N: tl.constexpr,
    BLOCK_D: tl.constexpr,
):
    pid_m, b, h, start, seqlen = _program(cu_ptr, H, N, VARLEN, BLOCK_M)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen:  # varlen: this sequence is shorter than max_seqlen
        return
    k_base = _head_ptr(k_ptr, b, h, skb, skh) + start * skn  # this sequence's first key
    v_base = _head_ptr(v_ptr, b, h, svb, svh) + start * svn
    offs_m = m0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_d = tl.arange(0, BLOCK_D)  # (BLOCK_D,)
    m_ok = offs_m < seqlen
    q = _load_rows(_head_ptr(q_ptr, b, h, sqb, sqh) + start * sqn, offs_m, m_ok, sqn, offs_d, D, UPCAST)

    m_i = tl.full((BLOCK_M,), float("-inf"), dtype=tl.float32)  # running max of the log2-scaled scores
    l_i = tl.zeros((BLOCK_M,), dtype=tl.float32)  # running sum of exp2(s - m_i)
    acc = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, seqlen, BLOCK_N):
        cols = n0 + offs_n
        n_ok = cols < seqlen
        k = _load_rows(k_base, cols, n_ok, skn, offs_d, D, UPCAST)  # (BLOCK_N, BLOCK_D)
        v = _load_rows(v_base, cols, n_ok, svn, offs_d, D, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N)
        # Every tile has at least one valid column (n0 < seqlen), so m_new is finite.
        s = tl.where(n_ok[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, axis=1))
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)  # 0 on the first tile (m_i = -inf)
        l_i = l_i * alpha + tl.sum(p, axis=1)
        # P goes into the PV dot in the input dtype, as on the GPU (rounded again if upcast).
        p = p.to(o_ptr.dtype.element_ty)
        if UPCAST:
            p = p.to(tl.float32)
        acc = tl.dot(p, v, acc * alpha[:, None], input_precision=DOT_PREC)
        m_i = m_new

    acc = acc / l_i[:, None]
    _store_rows(_head_ptr(o_ptr, b, h, sob, soh) + start * son, acc, offs_m, m_ok, son, offs_d, D)
    lse = (m_i + tl.math.log2(l_i)) / 1.4426950408889634  # natural-log logsumexp of scale * q k^T
    tl.store(lse_ptr + b * slb + h * slh + start + offs_m, lse, mask=m_ok)


@triton.autotune(configs=_BWD_CONFIGS, **_tune(backward=True, resident_kv=True))
@triton.jit
def _attn_bwd_dkdv_kernel(
    q_ptr,  # (B, H, N, D) strides (sqb, sqh, sqn, 1); varlen: (T, H, D) with sqb = 0
    k_ptr,  # same layout (own strides)
    v_ptr,  # same layout (own strides)
    do_ptr,  # same layout (own strides)
    lse_ptr,  # (B, H, N) fp32 strides (slb, slh, 1) -- also the layout of delta
    delta_ptr,  # (B, H, N) fp32 rowsum(dO * O)
    dk_ptr,  # same layout (own strides), q's dtype
    dv_ptr,  # same layout (own strides), q's dtype
    cu_ptr,  # (B + 1,) int32 when VARLEN
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, slb, slh,
    sdkb, sdkh, sdkn, sdvb, sdvh, sdvn,
    H, N, D, scale, qk_scale,
    VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,  # streamed Q tile
    BLOCK_N: tl.constexpr,  # resident K/V tile
    BLOCK_D: tl.constexpr,
):
    pid_n, b, h, start, seqlen = _program(cu_ptr, H, N, VARLEN, BLOCK_N)
    n0 = pid_n * BLOCK_N
    if n0 >= seqlen:
        return
    q_base = _head_ptr(q_ptr, b, h, sqb, sqh) + start * sqn  # this sequence's first query
    do_base = _head_ptr(do_ptr, b, h, sdb, sdh) + start * sdn
    row_base = b * slb + h * slh + start  # into lse and delta
    offs_n = n0 + tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_m = tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < seqlen
    k = _load_rows(_head_ptr(k_ptr, b, h, skb, skh), start + offs_n, n_ok, skn, offs_d, D, UPCAST)  # (BLOCK_N, BLOCK_D)
    v = _load_rows(_head_ptr(v_ptr, b, h, svb, svh), start + offs_n, n_ok, svn, offs_d, D, UPCAST)

    dk = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    dv = tl.zeros((BLOCK_N, BLOCK_D), dtype=tl.float32)
    for m0 in range(0, seqlen, BLOCK_M):
        rows = m0 + offs_m
        m_ok = rows < seqlen
        q = _load_rows(q_base, rows, m_ok, sqn, offs_d, D, UPCAST)  # (BLOCK_M, BLOCK_D)
        do = _load_rows(do_base, rows, m_ok, sdn, offs_d, D, UPCAST)
        # Padding rows get lse = +inf, hence P = 0: they add nothing to dV or dK.
        lse = tl.load(lse_ptr + row_base + rows, mask=m_ok, other=float("inf")) * 1.4426950408889634
        delta = tl.load(delta_ptr + row_base + rows, mask=m_ok, other=0.0)
        # Transposed scores (BLOCK_N, BLOCK_M): the K/V tile indexes rows, as dK and dV do.
        s_t = tl.dot(k, tl.trans(q), input_precision=DOT_PREC) * qk_scale
        p_t = tl.math.exp2(s_t - lse[None, :])
        p_lo = p_t.to(dk_ptr.dtype.element_ty)
        if UPCAST:
            p_lo = p_lo.to(tl.float32)
        dv = tl.dot(p_lo, do, dv, input_precision=DOT_PREC)
        dp_t = tl.dot(v, tl.trans(do), input_precision=DOT_PREC)  # (dO V^T)^T
        ds_t = (p_t * (dp_t - delta[None, :])).to(dk_ptr.dtype.element_ty)
        if UPCAST:
            ds_t = ds_t.to(tl.float32)
        dk = tl.dot(ds_t, q, dk, input_precision=DOT_PREC)

    dk = dk * scale
    _store_rows(_head_ptr(dk_ptr, b, h, sdkb, sdkh), dk, start + offs_n, n_ok, sdkn, offs_d, D)
    _store_rows(_head_ptr(dv_ptr, b, h, sdvb, sdvh), dv, start + offs_n, n_ok, sdvn, offs_d, D)


@triton.autotune(configs=_BWD_CONFIGS, **_tune(backward=True))
@triton.jit
def _attn_bwd_dq_kernel(
    q_ptr,  # (B, H, N, D) strides (sqb, sqh, sqn, 1); varlen: (T, H, D) with sqb = 0
    k_ptr,  # same layout (own strides)
    v_ptr,  # same layout (own strides)
    do_ptr,  # same layout (own strides)
    o_ptr,  # same layout (own strides): the forward output, for delta
    lse_ptr,  # (B, H, N) fp32 strides (slb, slh, 1) -- also the layout of delta
    delta_ptr,  # (B, H, N) fp32 rowsum(dO * O), written here for the dK/dV kernel after this one
    dq_ptr,  # same layout (own strides), q's dtype
    cu_ptr,  # (B + 1,) int32 when VARLEN
    sqb, sqh, sqn, skb, skh, skn, svb, svh, svn, sdb, sdh, sdn, sob, soh, son, slb, slh, sdqb, sdqh, sdqn,
    H, N, D, scale, qk_scale,
    VARLEN: tl.constexpr,
    UPCAST: tl.constexpr,
    DOT_PREC: tl.constexpr,
    BLOCK_M: tl.constexpr,  # resident Q tile
    BLOCK_N: tl.constexpr,  # streamed K/V tile
    BLOCK_D: tl.constexpr,
):
    pid_m, b, h, start, seqlen = _program(cu_ptr, H, N, VARLEN, BLOCK_M)
    m0 = pid_m * BLOCK_M
    if m0 >= seqlen:
        return
    k_base = _head_ptr(k_ptr, b, h, skb, skh) + start * skn  # this sequence's first key
    v_base = _head_ptr(v_ptr, b, h, svb, svh) + start * svn
    offs_m = m0 + tl.arange(0, BLOCK_M)  # (BLOCK_M,)
    offs_n = tl.arange(0, BLOCK_N)  # (BLOCK_N,)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < seqlen
    q = _load_rows(_head_ptr(q_ptr, b, h, sqb, sqh), start + offs_m, m_ok, sqn, offs_d, D, UPCAST)  # (BLOCK_M, BLOCK_D)
    do = _load_rows(_head_ptr(do_ptr, b, h, sdb, sdh), start + offs_m, m_ok, sdn, offs_d, D, UPCAST)
    row_base = b * slb + h * slh + start
    lse = tl.load(lse_ptr + row_base + offs_m, mask=m_ok, other=float("inf")) * 1.4426950408889634
    # delta from the dO tile already here: no separate pass re-reads dO (padding rows: 0)
    o = _load_rows(_head_ptr(o_ptr, b, h, sob, soh), start + offs_m, m_ok, son, offs_d, D, True)
    delta = tl.sum(o * do.to(tl.float32), axis=1)  # (BLOCK_M,)
    tl.store(delta_ptr + row_base + offs_m, delta, mask=m_ok)

    dq = tl.zeros((BLOCK_M, BLOCK_D), dtype=tl.float32)
    for n0 in range(0, seqlen, BLOCK_N):
        cols = n0 + offs_n
        n_ok = cols < seqlen
        k = _load_rows(k_base, cols, n_ok, skn, offs_d, D, UPCAST)  # (BLOCK_N, BLOCK_D)
        v = _load_rows(v_base, cols, n_ok, svn, offs_d, D, UPCAST)
        s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale  # (BLOCK_M, BLOCK_N)
        # Padding K rows score 0, not -inf: mask their probabilities explicitly.
        p = tl.where(n_ok[None, :], tl.math.exp2(s - lse[:, None]), 0.0)
        dp = tl.dot(do, tl.trans(v), input_precision=DOT_PREC)
        ds = (p * (dp - delta[:, None])).to(dq_ptr.dtype.element_ty)
        if UPCAST:
            ds = ds.to(tl.float32)
        dq = tl.dot(ds, k, dq, input_precision=DOT_PREC)

    dq = dq * scale
    _store_rows(_head_ptr(dq_ptr, b, h, sdqb, sdqh), dq, start + offs_m, m_ok, sdqn, offs_d, D)


# --- launchers ----------------------------------------------------------------------------------
def _row_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, token) strides: (B, H, N, D) as is; packed (T, H, D) has no batch stride."""
    return (0, t.stride(1), t.stride(0)) if varlen else (t.stride(0), t.stride(1), t.stride(2))


def _lse_strides(lse: torch.Tensor, varlen: bool) -> tuple[int, int]:
    """(batch, head) strides of the fp32 row statistics: (B, H, N) dense, (H, T) packed."""
    return (0, lse.stride(0)) if varlen else (lse.stride(0), lse.stride(1))


def _alloc_like(q: torch.Tensor, varlen: bool) -> torch.Tensor:
    """An output for q's shape. Dense outputs are (B, N, H, D) in memory, seen as (B, H, N, D): the
    ViT's ``o.transpose(1, 2).reshape(B, N, H * D)`` after attention is then free."""
    if varlen:
        return q.new_empty(q.shape)
    B, H, N, D = q.shape
    return q.new_empty((B, N, H, D)).transpose(1, 2)


def _stats_empty(q: torch.Tensor, varlen: bool) -> torch.Tensor:
    """(B, H, N) fp32 dense, (H, T) fp32 packed: per-row logsumexp or delta."""
    shape = (q.shape[1], q.shape[0]) if varlen else tuple(q.shape[:3])
    return q.new_empty(shape, dtype=torch.float32)


def _geometry(q: torch.Tensor, cu_seqlens: Optional[torch.Tensor], max_seqlen: int) -> tuple[int, int, int, int]:
    """(B, H, N, D): for varlen B = number of sequences and N = max_seqlen."""
    if cu_seqlens is not None:
        return cu_seqlens.shape[0] - 1, q.shape[1], max_seqlen, q.shape[2]
    B, H, N, D = q.shape
    return B, H, N, D


def _common_consts(q: torch.Tensor, varlen: bool, D: int) -> dict:
    upcast = _INTERPRET or q.dtype == torch.float32
    return dict(VARLEN=varlen, UPCAST=upcast, DOT_PREC="ieee" if upcast else "tf32",
                BLOCK_D=max(16, triton.next_power_of_2(D)))


def _grid(kernel: str, B: int, H: int, N: int, block: str, varlen: bool):
    """The 1-D launch grid of :func:`_program` (``block``: the meta-parameter that tiles N), checked
    against CUDA's limit first at the smallest tile any config uses, so no config can pass it."""
    def grid(meta):
        return (triton.cdiv(N, meta[block]) * B * H,)
    shape = f"{B} {'sequences' if varlen else 'batch'} x {H} heads x {'max_seqlen' if varlen else 'N'}={N}"
    check_grid(f"attention {kernel}", grid({block: _MIN_BLOCK}), shape)
    return grid


def _fwd_triton(q, k, v, cu_seqlens, max_seqlen, scale):
    varlen = cu_seqlens is not None
    q, k, v = unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    o, lse = _alloc_like(q, varlen), _stats_empty(q, varlen)
    B, H, N, D = _geometry(q, cu_seqlens, max_seqlen)
    if B * H == 0 or N == 0 or q.numel() == 0:
        return o, lse
    _attn_fwd_kernel[_grid("forward", B, H, N, "BLOCK_M", varlen)](
        q, k, v, o, lse, cu_seqlens if varlen else lse,
        *_row_strides(q, varlen), *_row_strides(k, varlen), *_row_strides(v, varlen), *_row_strides(o, varlen),
        *_lse_strides(lse, varlen),
        H, N, D, scale * _LOG2E,
        **_common_consts(q, varlen, D),
    )
    return o, lse


def _bwd_triton(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale, out=None):
    """dq, dk, dv; written into ``out`` (three strided (B, H, N, D) views, e.g. of one packed
    gradient) when given, else into fresh (B, N, H, D)-memory tensors."""
    varlen = cu_seqlens is not None
    do, q, k, v = unit_last_stride(do), unit_last_stride(q), unit_last_stride(k), unit_last_stride(v)
    dq, dk, dv = out if out is not None else (_alloc_like(q, varlen), _alloc_like(q, varlen), _alloc_like(q, varlen))
    B, H, N, D = _geometry(q, cu_seqlens, max_seqlen)
    if B * H == 0 or N == 0 or q.numel() == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    consts = _common_consts(q, varlen, D)
    cu = cu_seqlens if varlen else lse
    ls = _lse_strides(lse, varlen)
    o = unit_last_stride(o)
    delta = torch.empty_like(lse)
    qs, ks, vs, dos = (_row_strides(t, varlen) for t in (q, k, v, do))
    # dQ first: it computes delta = rowsum(dO * O) from the dO tile it loads anyway, for dK / dV.
    _attn_bwd_dq_kernel[_grid("backward dq", B, H, N, "BLOCK_M", varlen)](
        q, k, v, do, o, lse, delta, dq, cu, *qs, *ks, *vs, *dos, *_row_strides(o, varlen), *ls,
        *_row_strides(dq, varlen), H, N, D, scale, scale * _LOG2E, **consts,
    )
    _attn_bwd_dkdv_kernel[_grid("backward dk/dv", B, H, N, "BLOCK_N", varlen)](
        q, k, v, do, lse, delta, dk, dv, cu, *qs, *ks, *vs, *dos, *ls,
        *_row_strides(dk, varlen), *_row_strides(dv, varlen),
        H, N, D, scale, scale * _LOG2E, **consts,
    )
    return dq, dk, dv


# --- custom ops (torch.compile traces through them) ---------------------------------------------
@torch.library.custom_op("maws_kernels::attention_fwd", mutates_args=())
def _attention_fwd_op(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: Optional[torch.Tensor], max_seqlen: int,
    scale: float,
) -> tuple[torch.Tensor, torch.Tensor]:
    """o like q (dense: (B, N, H, D) memory seen as (B, H, N, D)), lse (B, H, N) or (H, T) fp32."""
    return _fwd_triton(q, k, v, cu_seqlens, max_seqlen, scale)


@_attention_fwd_op.register_fake
def _(q, k, v, cu_seqlens, max_seqlen, scale):
    varlen = cu_seqlens is not None
    return _alloc_like(q, varlen), _stats_empty(q, varlen)


@torch.library.custom_op("maws_kernels::attention_bwd", mutates_args=())
def _attention_bwd_op(
    do: torch.Tensor, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
    cu_seqlens: Optional[torch.Tensor], max_seqlen: int, scale: float,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv, each shaped like q in q's dtype."""
    return _bwd_triton(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale)


@_attention_bwd_op.register_fake
def _(do, q, k, v, o, lse, cu_seqlens, max_seqlen, scale):
    varlen = cu_seqlens is not None
    return _alloc_like(q, varlen), _alloc_like(q, varlen), _alloc_like(q, varlen)


def _setup_context(ctx, inputs, output):
    q, k, v, cu_seqlens, max_seqlen, scale = inputs
    o, lse = output
    ctx.save_for_backward(q, k, v, o, lse, cu_seqlens)
    ctx.max_seqlen, ctx.scale = max_seqlen, scale


def _backward(ctx, do, _dlse):
    q, k, v, o, lse, cu_seqlens = ctx.saved_tensors
    dq, dk, dv = _attention_bwd_op(do, q, k, v, o, lse, cu_seqlens, ctx.max_seqlen, ctx.scale)
    return dq, dk, dv, None, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


def _unpack(qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B, N, 3, H, D) -> q, k, v as strided (B, H, N, D) views (no copy)."""
    return tuple(t.transpose(1, 2) for t in qkv.unbind(2))


@torch.library.custom_op("maws_kernels::attention_packed_fwd", mutates_args=())
def _attention_packed_fwd_op(qkv: torch.Tensor, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, N, 3, H, D) packed qkv -> o (B, N, H, D) contiguous in qkv's dtype, lse (B, H, N) fp32."""
    q, k, v = _unpack(qkv)
    o, lse = _fwd_triton(q, k, v, None, q.shape[2], scale)
    return o.transpose(1, 2), lse  # the (B, N, H, D) memory _alloc_like made, now seen as it is


@_attention_packed_fwd_op.register_fake
def _(qkv, scale):
    B, N, _, H, D = qkv.shape
    return qkv.new_empty((B, N, H, D)), qkv.new_empty((B, H, N), dtype=torch.float32)


@torch.library.custom_op("maws_kernels::attention_packed_bwd", mutates_args=())
def _attention_packed_bwd_op(do: torch.Tensor, qkv: torch.Tensor, o: torch.Tensor, lse: torch.Tensor,
                             scale: float) -> torch.Tensor:
    """dqkv (B, N, 3, H, D) in qkv's dtype: the kernels write dq, dk and dv straight into their slots, so
    the gradient of the qkv projection needs no stack and no copy."""
    dqkv = qkv.new_empty(qkv.shape)
    q, k, v = _unpack(qkv)
    _bwd_triton(do.transpose(1, 2), q, k, v, o.transpose(1, 2), lse, None, q.shape[2], scale, out=_unpack(dqkv))
    return dqkv


@_attention_packed_bwd_op.register_fake
def _(do, qkv, o, lse, scale):
    return qkv.new_empty(qkv.shape)


def _setup_packed(ctx, inputs, output):
    qkv, scale = inputs
    o, lse = output
    ctx.save_for_backward(qkv, o, lse)
    ctx.scale = scale


def _backward_packed(ctx, do, _dlse):
    qkv, o, lse = ctx.saved_tensors
    return _attention_packed_bwd_op(do, qkv, o, lse, ctx.scale), None


_attention_packed_fwd_op.register_autograd(_backward_packed, setup_context=_setup_packed)


# --- public functions ---------------------------------------------------------------------------
def _check_qkv(op: str, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dims: int, layout: str) -> None:
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != dims:
            raise ValueError(f"{op}: {name} must be {layout}, got shape {tuple(t.shape)}")
        if not t.is_floating_point():
            raise ValueError(f"{op}: {name} must be a floating tensor, got {t.dtype}")
    if not (q.shape == k.shape == v.shape):
        raise ValueError(f"{op}: q, k and v must have the same shape {layout}, got {tuple(q.shape)}, "
                         f"{tuple(k.shape)}, {tuple(v.shape)}")
    if not (q.dtype == k.dtype == v.dtype) or not (q.device == k.device == v.device):
        raise ValueError(f"{op}: q, k and v must share dtype and device, got {q.dtype}/{k.dtype}/{v.dtype} on "
                         f"{q.device}/{k.device}/{v.device}")
    if q.shape[-1] == 0:
        raise ValueError(f"{op}: head dim must be >= 1")


def _check_triton(op: str, q: torch.Tensor) -> None:
    if q.dtype not in _DTYPES:
        raise ValueError(f"{op}: the triton backend takes fp32/fp16/bf16, got {q.dtype}; use backend='torch'")
    if q.shape[-1] > _MAX_D:
        raise ValueError(f"{op}: the triton backend takes head dim D <= {_MAX_D}, got {q.shape[-1]}; "
                         "use backend='torch'")


def attention(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None, backend: str | None = None
) -> torch.Tensor:
    """Non-causal softmax attention ``softmax(scale * q @ k^T) @ v``, flash-style (no (N, N) scores).

    Differentiable in q, k and v; works under ``torch.compile(fullgraph=True)``.

    Args:
        q: (B, H, N, D) queries, any strides (e.g. slices of a packed qkv); fp32 / fp16 / bf16 for
            the Triton backend, with D <= 128 and any N.
        k: (B, H, N, D) keys, same shape, dtype and device as q.
        v: (B, H, N, D) values, same shape, dtype and device as q.
        scale: softmax scale; default ``D ** -0.5``.
        backend: "triton" | "torch" | None (see maws_kernels._backend); "torch" is :func:`attention_ref`.

    Returns:
        (B, H, N, D) in q's dtype. From the Triton backend its memory is (B, N, H, D), so
        ``o.transpose(1, 2).reshape(B, N, H * D)`` needs no copy.

    Raises:
        ValueError: shapes, dtypes or devices do not match, a non-floating input, or (Triton) an
            unsupported dtype or D > 128.
    """
    _check_qkv("attention", q, k, v, 4, "(B, H, N, D)")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = resolve_backend("attention", backend, _IMPLEMENTED, q.device)
    if backend == "torch":
        return attention_ref(q, k, v, scale)
    _check_triton("attention", q)
    o, _ = _attention_fwd_op(q, k, v, None, q.shape[2], scale)
    return o


def attention_qkvpacked(qkv: torch.Tensor, scale: Optional[float] = None, backend: str | None = None) -> torch.Tensor:
    """:func:`attention` on a packed (B, N, 3, H, D) qkv -- the qkv projection's output seen as
    ``(B, N, 3, H, D)`` -- returning (B, N, H, D).

    Nothing is copied either way: q, k and v are read through strides, the output is (B, N, H, D)
    so ``o.reshape(B, N, H * D)`` is a view, and the backward writes dq, dk and dv into one packed
    (B, N, 3, H, D) gradient (unpacked q / k / v would need a stack and a copy to make it).

    Args:
        qkv: (B, N, 3, H, D) with unit last stride; fp32 / fp16 / bf16 for the Triton backend, D <= 128.
        scale: softmax scale; default ``D ** -0.5``.
        backend: "triton" | "torch" | None; "torch" is :func:`attention_ref` on the unpacked views.

    Returns:
        (B, N, H, D) in qkv's dtype.

    Raises:
        ValueError: qkv is not (B, N, 3, H, D) floating, or (Triton) an unsupported dtype or D > 128.
    """
    if qkv.dim() != 5 or qkv.shape[2] != 3 or not qkv.is_floating_point():
        raise ValueError(f"attention_qkvpacked: qkv must be a floating (B, N, 3, H, D) tensor, got {qkv.dtype} "
                         f"of shape {tuple(qkv.shape)}")
    if qkv.shape[-1] == 0:
        raise ValueError("attention_qkvpacked: head dim must be >= 1")
    scale = qkv.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = resolve_backend("attention", backend, _IMPLEMENTED, qkv.device)
    if backend == "torch":
        return attention_ref(*_unpack(qkv), scale).transpose(1, 2)
    _check_triton("attention_qkvpacked", qkv)
    o, _ = _attention_packed_fwd_op(unit_last_stride(qkv), scale)
    return o


def attention_varlen(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, max_seqlen: int,
    scale: Optional[float] = None, backend: str | None = None,
) -> torch.Tensor:
    """Block-diagonal attention over packed sequences: each sequence attends only within itself.

    Args:
        q: (T, H, D) queries of all sequences back to back (T = total tokens), any strides.
        k: (T, H, D) keys, same shape, dtype and device as q.
        v: (T, H, D) values, same shape, dtype and device as q.
        cu_seqlens: (S + 1,) int32 prefix sums of the S sequence lengths: 0, n0, n0 + n1, ..., T.
            Not validated against T (that would cost a host sync); wrong values read out of bounds.
        max_seqlen: the longest sequence length (a Python int, so no host sync is needed).
        scale: softmax scale; default ``D ** -0.5``.
        backend: "triton" | "torch" | None; "torch" is :func:`attention_varlen_ref`.

    Returns:
        (T, H, D) in q's dtype.

    Raises:
        ValueError: as :func:`attention`, or cu_seqlens not a 1-D int32 tensor of >= 2 entries on
            q's device, or a negative max_seqlen.
    """
    _check_qkv("attention_varlen", q, k, v, 3, "(T, H, D)")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2 or cu_seqlens.dtype != torch.int32:
        raise ValueError(f"attention_varlen: cu_seqlens must be a 1-D int32 tensor (S + 1,), got "
                         f"{cu_seqlens.dtype} of shape {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"attention_varlen: cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
    if int(max_seqlen) < 0:
        raise ValueError(f"attention_varlen: max_seqlen must be >= 0, got {max_seqlen}")
    scale = q.shape[-1] ** -0.5 if scale is None else float(scale)
    backend = resolve_backend("attention_varlen", backend, _IMPLEMENTED, q.device)
    if backend == "torch":
        return attention_varlen_ref(q, k, v, cu_seqlens, scale)
    _check_triton("attention_varlen", q)
    o, _ = _attention_fwd_op(q, k, v, cu_seqlens, int(max_seqlen), scale)
    return o


# --- references ---------------------------------------------------------------------------------
def attention_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, scale: Optional[float] = None, upcast: bool = False
) -> torch.Tensor:
    """Reference: plain matmul-softmax-matmul (softmax in fp32); with ``upcast`` all in fp32."""
    scale = q.shape[-1] ** -0.5 if scale is None else scale
    if upcast:
        q, k, v = q.float(), k.float(), v.float()
    s = torch.matmul(q, k.transpose(-2, -1)) * scale  # (..., N, N)
    p = torch.softmax(s.float(), dim=-1).to(v.dtype)
    return torch.matmul(p, v)


def attention_varlen_ref(
    q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens: torch.Tensor, scale: Optional[float] = None,
    upcast: bool = False,
) -> torch.Tensor:
    """Reference for :func:`attention_varlen`: :func:`attention_ref` on each sequence in turn."""
    bounds = cu_seqlens.tolist()  # host sync: fine for a reference
    outs = []
    for a, b in zip(bounds[:-1], bounds[1:]):
        # (n, H, D) -> (1, H, n, D) and back
        qs, ks, vs = (t[a:b].transpose(0, 1).unsqueeze(0) for t in (q, k, v))
        outs.append(attention_ref(qs, ks, vs, scale, upcast)[0].transpose(0, 1))
    if not outs:
        return (q.float() if upcast else q).new_empty(q.shape)
    return torch.cat(outs, dim=0)


# --- compile scenarios: what maws_kernels.compile_check compiles (see _scenarios.py) ---------------
def _compile_run(dev: str, B: int, H: int, N: int, D: int, dtype: torch.dtype, varlen: bool) -> None:
    """Forward + backward as a ViT calls them: q, k, v are (B, H, N, D) views of one packed (B, N, 3, H, D)
    qkv; varlen packs B sequences of N tokens as (B * N, H, D) slices of (T, 3, H, D)."""
    if varlen:
        q, k, v = empty((B * N, 3, H, D), dtype, dev).unbind(1)
        cu = empty((B + 1,), torch.int32, dev)
    else:
        q, k, v = empty((B, N, 3, H, D), dtype, dev).permute(2, 0, 3, 1, 4).unbind(0)
        cu = None
    o, lse = op_impl(_attention_fwd_op)(q, k, v, cu, N, D ** -0.5)
    op_impl(_attention_bwd_op)(o, q, k, v, o, lse, cu, N, D ** -0.5)


def compile_scenarios(shapes: CompileShapes) -> Iterator[Scenario]:
    """Every attention of a model's steps: MAE encoder (kept patches + cls; also varlen), MAE decoder,
    WSP / fine-tuning (every patch + cls), high-resolution fine-tuning. Without variants each (head dim,
    dtype) compiles once, varlen once per dtype and fp32 at the encoder only (5 autotune configs x 3
    kernels each; N and H barely change the binary)."""
    seen: set = set()
    for s in shapes.steps():
        m, B = s.model, s.batch
        enc_d, dec_d = m.width // m.heads, m.dec_width // m.dec_heads
        # (where, heads, tokens, head dim)
        attentions = (("enc", m.heads, m.keep + 1, enc_d), ("dec", m.dec_heads, m.num_patches + 1, dec_d),
                      ("wsp", m.heads, m.num_patches + 1, enc_d), ("ft-hires", m.heads, shapes.hires_tokens, enc_d))
        for where, H, N, D in attentions:
            for varlen in (False, True) if where == "enc" else (False,):
                key = (s.act, varlen) if varlen else (s.act, D)
                if not shapes.variants and (key in seen or (s.act == torch.float32 and where != "enc")):
                    continue
                seen.add(key)
                yield Scenario(f"{s.tag} attn {where} H={H} N={N} D={D} {dt_name(s.act)}{' varlen' if varlen else ''}",
                               _compile_run, (B, H, N, D, s.act, varlen))
