"""Softmax cross-entropy against soft targets (WSP: the multi-hot divided by its tag count).

``loss_b = -sum_v t[b, v] * log_softmax(x[b])[v] = lse_b * sum_v t[b, v] - sum_v t[b, v] x[b, v]``
and ``d loss_b / d x[b] = softmax(x[b]) * sum_v t[b, v] - t[b]`` (``softmax - t`` when rows sum
to 1). Targets come dense, (B, V), or sparse: tag ids (B, T) int64 (negative = padding) and their
weights (B, T), so the dense target never has to exist.

The fused forward streams each row once (online logsumexp) and keeps only lse and sum(t) per
row; the backward streams it once more and writes the gradient in the logits' dtype -- the
only full-size buffer, and one the caller needs anyway. torch eager instead materialises an
fp32 log_softmax (forward), the product with the targets, and another fp32 buffer in backward.

:func:`linear_soft_target_cross_entropy` fuses the classifier head too: it computes the logits
of a chunk of rows, turns them in place into their gradient, and folds that straight into the
input, weight and bias gradients -- the (B, V) logits exist one chunk at a time.
"""
from __future__ import annotations

from typing import Iterator

import torch
from maws_kernels._triton import tl, triton

from maws_kernels._backend import resolve_backend, unit_last_stride
from maws_kernels._grid import check_grid
from maws_kernels._scenarios import PRECISIONS, CompileShapes, Scenario, empty, op_impl

_IMPLEMENTED = ("triton", "torch")
_MAX_BLOCK_V = 4096
_NUM_WARPS = 8


@triton.jit
def _sparse_tags(ids_ptr, wts_ptr, row, V, T, s_i, s_w, BLOCK_T: tl.constexpr):
    """(BLOCK_T,) tag ids of ``row`` and their fp32 weights; padding (ids outside [0, V)) weighs 0."""
    toff = tl.arange(0, BLOCK_T)
    ids = tl.load(ids_ptr + row * s_i + toff, mask=toff < T, other=-1)
    tag = (ids >= 0) & (ids < V)
    wts = tl.where(tag, tl.load(wts_ptr + row * s_w + toff, mask=toff < T, other=0.0).to(tl.float32), 0.0)
    return ids, tag, wts


@triton.jit
def _grad_chunk(x_row, tgt_row, grad_row, v, V, ids, wts, lse, ts, g, SPARSE: tl.constexpr):
    """Write g * (softmax * sum(t) - t) for the columns ``v`` of one row."""
    valid = v < V
    x = tl.load(x_row + v, mask=valid, other=0.0).to(tl.float32)
    if SPARSE:
        # scatter the few tags of this row into the chunk: (T, BLOCK_V) compares, summed over T,
        # so repeated ids add up exactly as a dense target would
        t = tl.sum(tl.where(ids[:, None] == v[None, :], wts[:, None], 0.0), axis=0)
    else:
        t = tl.load(tgt_row + v, mask=valid, other=0.0).to(tl.float32)
    dx = g * (tl.exp(x - lse) * ts - t)
    tl.store(grad_row + v, dx.to(grad_row.dtype.element_ty), mask=valid)


@triton.jit
def _soft_ce_fwd_kernel(
    logits_ptr,  # (B, V), last dim contiguous, row stride s_x
    tgt_ptr,  # dense: (B, V) row stride s_t, last dim contiguous; sparse: unused
    ids_ptr,  # sparse: (B, T) int64 row stride s_i; ids outside [0, V) are padding
    wts_ptr,  # sparse: (B, T) float row stride s_w
    loss_ptr,  # (B,) fp32 out: per-row loss
    lse_ptr,  # (B,) fp32 out: logsumexp per row
    tsum_ptr,  # (B,) fp32 out: sum of the row's targets
    gscale_ptr,  # (B,) fp32, WRITE_GRAD: d(total) / d(loss_b), the scale of each gradient row
    grad_ptr,  # (B, V) row stride s_g, logits dtype, WRITE_GRAD; may alias logits_ptr (in place)
    V, T, s_x, s_t, s_i, s_w, s_g,
    SPARSE: tl.constexpr, WRITE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr, BLOCK_T: tl.constexpr,
):
    row = tl.program_id(0).to(tl.int64)
    x_row = logits_ptr + row * s_x
    cols = tl.arange(0, BLOCK_V)
    if SPARSE:
        ids, tag, wts = _sparse_tags(ids_ptr, wts_ptr, row, V, T, s_i, s_w, BLOCK_T)
    else:
        ids, wts = 0, 0  # unused by the dense path
    # Per-lane online logsumexp: lanes reduce once at the end, not once per chunk.
    m_lane = tl.full([BLOCK_V], float("-inf"), tl.float32)
    s_lane = tl.zeros([BLOCK_V], tl.float32)
    tx_lane = tl.zeros([BLOCK_V], tl.float32)
    ts_lane = tl.zeros([BLOCK_V], tl.float32)
    for start in range(0, V, BLOCK_V):
        v = start + cols
        valid = v < V
        x = tl.load(x_row + v, mask=valid, other=float("-inf")).to(tl.float32)
        m_new = tl.maximum(m_lane, x)
        # A lane that has seen no valid column keeps m = -inf; subtracting 0 there instead
        # avoids inf - inf, and exp(-inf) = 0 leaves its sum at 0.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        s_lane = s_lane * tl.exp(m_lane - m_safe) + tl.exp(x - m_safe)
        m_lane = m_new
        if not SPARSE:
            t = tl.load(tgt_ptr + row * s_t + v, mask=valid, other=0.0).to(tl.float32)
            tx_lane += t * tl.where(valid, x, 0.0)  # masked lanes hold x = -inf
            ts_lane += t
    m = tl.max(m_lane, axis=0)
    s = tl.sum(s_lane * tl.exp(m_lane - m), axis=0)  # m is finite: V >= 1
    lse = m + tl.log(s)
    if SPARSE:
        xt = tl.load(x_row + ids, mask=tag, other=0.0).to(tl.float32)
        tx = tl.sum(wts * xt, axis=0)
        ts = tl.sum(wts, axis=0)
    else:
        tx = tl.sum(tx_lane, axis=0)
        ts = tl.sum(ts_lane, axis=0)
    tl.store(loss_ptr + row, lse * ts - tx)
    tl.store(lse_ptr + row, lse)
    tl.store(tsum_ptr + row, ts)
    if WRITE_GRAD:  # the fused head: turn the row into its gradient while it is hot in L2
        g = tl.load(gscale_ptr + row)
        for start in range(0, V, BLOCK_V):
            _grad_chunk(x_row, tgt_ptr + row * s_t, grad_ptr + row * s_g, start + cols, V, ids, wts, lse, ts, g,
                        SPARSE)


@triton.jit
def _soft_ce_bwd_kernel(
    logits_ptr,  # (B, V), last dim contiguous, row stride s_x
    tgt_ptr,  # dense: (B, V) row stride s_t; sparse: unused
    ids_ptr,  # sparse: (B, T) int64 row stride s_i
    wts_ptr,  # sparse: (B, T) float row stride s_w
    lse_ptr,  # (B,) fp32 from the forward
    tsum_ptr,  # (B,) fp32 from the forward
    gscale_ptr,  # (B,) fp32: d(total) / d(loss_b)
    grad_ptr,  # (B, V) contiguous, logits dtype
    V, T, s_x, s_t, s_i, s_w,
    SPARSE: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_T: tl.constexpr,
):
    # A (row, chunk) grid: every column's gradient is independent once lse is known, so a batch
    # of a few rows per GPU still fills the machine (one program per row would not).
    row = tl.program_id(0).to(tl.int64)
    v = tl.program_id(1) * BLOCK_V + tl.arange(0, BLOCK_V)
    if SPARSE:
        ids, tag, wts = _sparse_tags(ids_ptr, wts_ptr, row, V, T, s_i, s_w, BLOCK_T)
    else:
        ids, wts = 0, 0
    _grad_chunk(logits_ptr + row * s_x, tgt_ptr + row * s_t, grad_ptr + row * V, v, V, ids, wts,
                tl.load(lse_ptr + row), tl.load(tsum_ptr + row), tl.load(gscale_ptr + row), SPARSE)


def _blocks(V: int, T: int) -> tuple[int, int]:
    return min(_MAX_BLOCK_V, triton.next_power_of_2(V)), triton.next_power_of_2(max(T, 1))


def _launch(logits, targets, ids, wts, *, write_grad, gscale=None, grad=None):
    """Forward kernel (optionally writing the gradient too); returns (loss_rows, lse, tsum)."""
    B, V = logits.shape
    sparse = targets is None
    T = ids.shape[1] if sparse else 0
    dev = logits.device
    loss, lse, tsum = (torch.empty(B, device=dev, dtype=torch.float32) for _ in range(3))
    block_v, block_t = _blocks(V, T)
    dummy = logits  # stands in for the pointers a mode does not read; never dereferenced
    if B:
        _soft_ce_fwd_kernel[check_grid("soft-target CE forward", (B,), f"logits {B} x {V}")](
            logits, dummy if sparse else targets, ids if sparse else dummy, wts if sparse else dummy,
            loss, lse, tsum, gscale if write_grad else dummy, grad if write_grad else dummy,
            V, T, logits.stride(0), 0 if sparse else targets.stride(0), ids.stride(0) if sparse else 0,
            wts.stride(0) if sparse else 0, grad.stride(0) if write_grad else 0,
            SPARSE=sparse, WRITE_GRAD=write_grad, BLOCK_V=block_v, BLOCK_T=block_t, num_warps=_NUM_WARPS,
        )
    return loss, lse, tsum


def _launch_bwd(grad_rows, logits, lse, tsum, targets, ids, wts):
    B, V = logits.shape
    sparse = targets is None
    T = ids.shape[1] if sparse else 0
    grad = torch.empty((B, V), device=logits.device, dtype=logits.dtype)
    block_v, block_t = _blocks(V, T)
    dummy = logits
    if B:
        grid = check_grid("soft-target CE backward", (B, triton.cdiv(V, block_v)), f"logits {B} x {V}")
        _soft_ce_bwd_kernel[grid](
            logits, dummy if sparse else targets, ids if sparse else dummy, wts if sparse else dummy,
            lse, tsum, grad_rows.float().contiguous(), grad,
            V, T, logits.stride(0), 0 if sparse else targets.stride(0), ids.stride(0) if sparse else 0,
            wts.stride(0) if sparse else 0,
            SPARSE=sparse, BLOCK_V=block_v, BLOCK_T=block_t, num_warps=_NUM_WARPS,
        )
    return grad


@torch.library.custom_op("maws_kernels::soft_target_ce_fwd", mutates_args=())
def _ce_fwd_op(logits: torch.Tensor, targets: torch.Tensor | None, ids: torch.Tensor | None,
               wts: torch.Tensor | None) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(B,) per-row loss, (B,) lse, (B,) sum of targets, all fp32."""
    return _launch(logits, targets, ids, wts, write_grad=False)


@_ce_fwd_op.register_fake
def _(logits, targets, ids, wts):
    B = logits.shape[0]
    return tuple(logits.new_empty(B, dtype=torch.float32) for _ in range(3))


@torch.library.custom_op("maws_kernels::soft_target_ce_bwd", mutates_args=())
def _ce_bwd_op(grad_rows: torch.Tensor, logits: torch.Tensor, lse: torch.Tensor, tsum: torch.Tensor,
               targets: torch.Tensor | None, ids: torch.Tensor | None, wts: torch.Tensor | None) -> torch.Tensor:
    return _launch_bwd(grad_rows, logits, lse, tsum, targets, ids, wts)


@_ce_bwd_op.register_fake
def _(grad_rows, logits, lse, tsum, targets, ids, wts):
    return logits.new_empty(logits.shape)


def _ce_setup(ctx, inputs, output):
    logits, targets, ids, wts = inputs
    _, lse, tsum = output
    ctx.save_for_backward(logits, lse, tsum, targets, ids, wts)


def _ce_backward(ctx, grad_rows, _grad_lse, _grad_tsum):
    logits, lse, tsum, targets, ids, wts = ctx.saved_tensors
    return _ce_bwd_op(grad_rows, logits, lse, tsum, targets, ids, wts), None, None, None


_ce_fwd_op.register_autograd(_ce_backward, setup_context=_ce_setup)


def _check_targets(logits, targets, target_ids, target_weights, op):
    if logits.dim() != 2:
        raise ValueError(f"{op}: logits must be (B, V), got {tuple(logits.shape)}")
    if not logits.is_floating_point():
        raise ValueError(f"{op}: logits must be floating point, got {logits.dtype}")
    for name, t in (("targets", targets), ("target_ids", target_ids), ("target_weights", target_weights)):
        if t is not None and t.device != logits.device and logits.device.type != "meta":
            raise ValueError(f"{op}: {name} is on {t.device} but the logits on {logits.device}; move it there")
    if targets is not None and not targets.is_floating_point():
        raise ValueError(f"{op}: targets must be floating point, got {targets.dtype}")
    if (targets is None) == (target_ids is None):
        raise ValueError(f"{op}: pass exactly one of targets (dense (B, V)) or target_ids + target_weights (sparse)")
    B = logits.shape[0]
    if targets is not None:
        if targets.shape != logits.shape:
            raise ValueError(f"{op}: targets must match logits {tuple(logits.shape)}, got {tuple(targets.shape)}")
        return
    if target_weights is None or target_ids.shape != target_weights.shape or target_ids.dim() != 2 \
            or target_ids.shape[0] != B:
        raise ValueError(f"{op}: target_ids and target_weights must both be (B, T) with B = {B}; got "
                         f"{None if target_ids is None else tuple(target_ids.shape)} and "
                         f"{None if target_weights is None else tuple(target_weights.shape)}")
    if target_ids.dtype != torch.int64:
        raise ValueError(f"{op}: target_ids must be int64 (negative = padding), got {target_ids.dtype}")


def _reduce(rows: torch.Tensor, reduction: str) -> torch.Tensor:
    if reduction == "mean":
        return rows.mean()
    if reduction == "sum":
        return rows.sum()
    if reduction == "none":
        return rows
    raise ValueError(f"reduction must be 'mean', 'sum' or 'none', got {reduction!r}")


def soft_target_cross_entropy(
    logits: torch.Tensor,
    targets: torch.Tensor | None = None,
    *,
    target_ids: torch.Tensor | None = None,
    target_weights: torch.Tensor | None = None,
    reduction: str = "mean",
    backend: str | None = None,
) -> torch.Tensor:
    """Cross-entropy of (B, V) logits against soft targets, dense or sparse.

    Args:
        logits: (B, V) fp32 / fp16 / bf16.
        targets: (B, V) dense targets whose rows sum to 1 (not differentiated).
        target_ids: (B, T) int64 tag ids; ids outside [0, V) (use -1) are padding (sparse form, instead of targets).
        target_weights: (B, T) weight of each tag id (e.g. 1 / number of tags).
        reduction: "mean" (over rows, as WSP), "sum" or "none" (per-row fp32 losses).
        backend: "triton" | "torch" | None (see maws_kernels._backend).

    Returns:
        fp32 loss (the per-row losses for reduction="none").
    """
    op = "soft_target_cross_entropy"
    _check_targets(logits, targets, target_ids, target_weights, op)
    backend = resolve_backend(op, backend, _IMPLEMENTED, logits.device)
    if targets is None:
        targets_d = None
        ids, wts = target_ids.contiguous(), target_weights.detach().contiguous()
    else:
        targets_d, ids, wts = targets.detach(), None, None
    if backend == "torch":
        if targets_d is None:
            targets_d = sparse_to_dense(ids, wts, logits.shape[1])
        return _reduce(_ref_rows(logits, targets_d, upcast=True), reduction)
    rows, _, _ = _ce_fwd_op(unit_last_stride(logits), None if targets_d is None else unit_last_stride(targets_d),
                            ids, wts)
    return _reduce(rows, reduction)


@torch.library.custom_op("maws_kernels::linear_soft_target_ce", mutates_args=())
def _linear_ce_op(x: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, targets: torch.Tensor | None,
                  ids: torch.Tensor | None, wts: torch.Tensor | None, chunk_rows: int,
                  need_grad: bool) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Mean loss and, when ``need_grad``, its gradients for x, weight and bias (empty otherwise).

    The gradients are computed here, in the forward, one chunk of rows at a time: each chunk's
    logits are turned in place into d(mean loss)/d(logits) and folded into the three gradients,
    so the (B, V) logits never exist at once. The backward only scales them by the upstream grad.
    """
    B, D = x.shape
    V = weight.shape[0]
    dev = x.device
    loss_rows = torch.empty(B, device=dev, dtype=torch.float32)
    inv_b = torch.full((B,), 1.0 / B, device=dev, dtype=torch.float32)  # d(mean)/d(row)
    single = chunk_rows >= B
    grad_x = torch.empty_like(x) if need_grad else x.new_empty(0)
    # One chunk: the weight gradient is one GEMM straight into its dtype. Several: accumulate in fp32.
    grad_w = weight.new_empty(0) if not need_grad or single else torch.zeros(V, D, device=dev, dtype=torch.float32)
    grad_b = torch.zeros(V, device=dev, dtype=torch.float32) if need_grad and bias is not None else x.new_empty(0)
    for start in range(0, B, chunk_rows):
        sl = slice(start, min(start + chunk_rows, B))
        logits = x[sl] @ weight.t()  # (b, V) in x's dtype, fp32 accumulation
        if bias is not None:
            logits += bias
        rows, _, _ = _launch(logits, None if targets is None else targets[sl], None if ids is None else ids[sl],
                             None if wts is None else wts[sl], write_grad=need_grad, gscale=inv_b[sl],
                             grad=logits if need_grad else None)
        loss_rows[sl] = rows
        if need_grad:  # logits now hold d(mean loss)/d(logits) of this chunk
            grad_x[sl] = logits @ weight
            if single:
                grad_w = (logits.t() @ x[sl]).to(weight.dtype)
            else:
                grad_w += (logits.t() @ x[sl]).float()
            if bias is not None:
                grad_b += logits.sum(0, dtype=torch.float32)
    if need_grad:
        grad_w = grad_w.to(weight.dtype)
        grad_b = grad_b.to(bias.dtype) if bias is not None else grad_b
    return loss_rows.mean(), grad_x, grad_w, grad_b


@_linear_ce_op.register_fake
def _(x, weight, bias, targets, ids, wts, chunk_rows, need_grad):
    if not need_grad:
        return x.new_empty((), dtype=torch.float32), x.new_empty(0), weight.new_empty(0), x.new_empty(0)
    grad_b = bias.new_empty(bias.shape) if bias is not None else x.new_empty(0)
    return x.new_empty((), dtype=torch.float32), x.new_empty(x.shape), weight.new_empty(weight.shape), grad_b


def _linear_ce_setup(ctx, inputs, output):
    _, grad_x, grad_w, grad_b = output
    ctx.has_bias = inputs[2] is not None
    ctx.save_for_backward(grad_x, grad_w, grad_b)


def _linear_ce_backward(ctx, g, _gx, _gw, _gb):
    grad_x, grad_w, grad_b = ctx.saved_tensors
    if grad_x.numel() == 0 and grad_w.numel() == 0:
        raise RuntimeError("linear_soft_target_cross_entropy: called under no_grad, so it kept no gradients")
    db = grad_b * g.to(grad_b.dtype) if ctx.has_bias else None
    return grad_x * g.to(grad_x.dtype), grad_w * g.to(grad_w.dtype), db, None, None, None, None, None


_linear_ce_op.register_autograd(_linear_ce_backward, setup_context=_linear_ce_setup)


def linear_soft_target_cross_entropy(
    x: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None = None,
    targets: torch.Tensor | None = None,
    *,
    target_ids: torch.Tensor | None = None,
    target_weights: torch.Tensor | None = None,
    chunk_rows: int | None = None,
    backend: str | None = None,
) -> torch.Tensor:
    """Mean soft-target CE of ``x @ weight.T + bias`` without holding all (B, V) logits.

    Args:
        x: (B, D) features (the WSP head's input).
        weight: (V, D) head weight; bias: (V,) or None.
        targets / target_ids / target_weights: as :func:`soft_target_cross_entropy`.
        chunk_rows: rows per chunk (default: enough that a chunk's logits stay under 2^24 elements).
        backend: "triton" | "torch" | None.

    Returns:
        0-d fp32 mean loss; gradients flow to x, weight and bias.
    """
    op = "linear_soft_target_cross_entropy"
    if x.dim() != 2 or weight.dim() != 2 or x.shape[1] != weight.shape[1]:
        raise ValueError(f"{op}: x must be (B, D) and weight (V, D); got {tuple(x.shape)}, {tuple(weight.shape)}")
    if bias is not None and bias.shape != (weight.shape[0],):
        raise ValueError(f"{op}: bias must be (V,) = ({weight.shape[0]},), got {tuple(bias.shape)}")
    for name, t in (("weight", weight), ("bias", bias)):
        mixed = t is not None and t.dtype != x.dtype and not torch.is_autocast_enabled(x.device.type)
        if t is not None and (t.device != x.device or mixed):
            raise ValueError(f"{op}: {name} is {t.dtype} on {t.device} but x is {x.dtype} on {x.device}; they must "
                             "match (or run under torch.autocast)")
    B, V = x.shape[0], weight.shape[0]
    _check_targets(x.new_empty(B, V, device="meta"), targets, target_ids, target_weights, op)
    for name, t in (("targets", targets), ("target_ids", target_ids), ("target_weights", target_weights)):
        if t is not None and t.device != x.device:
            raise ValueError(f"{op}: {name} is on {t.device} but x on {x.device}; move it there")
    backend = resolve_backend(op, backend, _IMPLEMENTED, x.device)
    if backend == "torch":
        logits = torch.nn.functional.linear(x, weight, bias)  # exactly what an nn.Linear head computes
        return soft_target_cross_entropy(logits, targets, target_ids=target_ids, target_weights=target_weights,
                                         backend="torch")
    chunk_rows = chunk_rows or max(1, (1 << 24) // max(V, 1))
    ids = None if target_ids is None else target_ids.contiguous()
    wts = None if target_weights is None else target_weights.detach().contiguous()
    t = None if targets is None else targets.detach().contiguous()
    # Under no_grad (evaluation) only the loss is computed: no gradient GEMMs, no (V, D) buffer.
    need_grad = torch.is_grad_enabled() and any(a is not None and a.requires_grad for a in (x, weight, bias))
    loss, _, _, _ = _linear_ce_op(x.contiguous(), weight, bias, t, ids, wts, chunk_rows, need_grad)
    return loss


def sparse_to_dense(target_ids: torch.Tensor, target_weights: torch.Tensor, num_classes: int) -> torch.Tensor:
    """(B, T) ids + weights -> (B, V) fp32 dense targets (repeated ids add up).

    Ids outside [0, V) are padding, as in the Triton kernel (use -1).
    """
    keep = (target_ids >= 0) & (target_ids < num_classes)
    dense = torch.zeros(target_ids.shape[0], num_classes, device=target_ids.device, dtype=torch.float32)
    return dense.scatter_add_(1, torch.where(keep, target_ids, 0), torch.where(keep, target_weights.float(), 0.0))


def _ref_rows(logits: torch.Tensor, targets: torch.Tensor, upcast: bool) -> torch.Tensor:
    if upcast and logits.element_size() < 4:
        logits = logits.float()
    logp = torch.log_softmax(logits, dim=-1)
    return -(targets.to(logp.dtype) * logp).sum(dim=-1)


def soft_target_cross_entropy_ref(logits: torch.Tensor, targets: torch.Tensor, upcast: bool = True) -> torch.Tensor:
    """Reference: (B, V) logits, (B, V) targets -> scalar mean loss (fp16/bf16 upcast to fp32 when upcast)."""
    return _ref_rows(logits, targets, upcast).mean()


# --- compile scenarios: what maws_kernels.compile_check compiles (see _scenarios.py) ---------------
def _compile_targets(dev, B, V, T, data, sparse):
    """(targets, ids, wts): dense (B, V) targets, or T sparse tags per row."""
    if sparse:
        return None, empty((B, T), torch.int64, dev), empty((B, T), data, dev)
    return empty((B, V), data, dev), None, None


def _compile_ce(dev: str, B: int, V: int, T: int, act: torch.dtype, data: torch.dtype, sparse: bool) -> None:
    logits = empty((B, V), act, dev)
    tgt, ids, wts = _compile_targets(dev, B, V, T, data, sparse)
    loss, lse, tsum = op_impl(_ce_fwd_op)(logits, tgt, ids, wts)
    op_impl(_ce_bwd_op)(loss, logits, lse, tsum, tgt, ids, wts)


def _compile_linear_ce(dev: str, B: int, D: int, V: int, T: int, act: torch.dtype, data: torch.dtype,
                       sparse: bool) -> None:
    x, w, bias = empty((B, D), act, dev), empty((V, D), act, dev), empty((V,), act, dev)
    tgt, ids, wts = _compile_targets(dev, B, V, T, data, sparse)
    op_impl(_linear_ce_op)(x, w, bias, tgt, ids, wts, max(1, (1 << 24) // V), True)  # the default chunk_rows


def compile_scenarios(shapes: CompileShapes) -> Iterator[Scenario]:
    """Soft-target CE forward + backward and the fused head + CE (with gradients), sparse and dense
    targets, at every vocabulary and batch."""
    for prec in shapes.precisions:
        act, data = PRECISIONS[prec]
        for V, T in shapes.vocabs:
            for B in shapes.batches:
                for sparse in (True, False):
                    kind = f"sparse T={T}" if sparse else "dense"
                    yield Scenario(f"b{B} V={V} {kind} {prec}", _compile_ce, (B, V, T, act, data, sparse))
                    # linear CE slices x per chunk, which fake CUDA tensors cannot do (no CUDA device
                    # guard in a CPU torch); its launcher makes no device-dependent choice, so meta is exact.
                    D = shapes.head_width
                    yield Scenario(f"linear b{B} D={D} V={V} {kind} {prec}", _compile_linear_ce,
                                   (B, D, V, T, act, data, sparse), device="meta")
