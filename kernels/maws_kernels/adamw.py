"""Fused AdamW step over flat 1-D buffers (fp32 master shard + optional bf16/fp16 model copy).

One pass reads param, grad, exp_avg, exp_avg_sq and writes param, exp_avg, exp_avg_sq and the
low-precision model copy: 28 bytes per element with bf16 grads, where torch's eager AdamW makes
one pass per op plus a separate cast for the copy. The ZeRO optimizer keeps each rank's master
shard in one flat buffer per param group, so the kernel sees one contiguous range and needs no
multi-tensor bookkeeping.

The math mirrors ``torch.optim.AdamW(foreach=False)`` op for op (facts from torch/optim/adam.py,
``_single_tensor_adam`` with ``decoupled_weight_decay=True``), each scalar computed on the host
in double and rounded to fp32 as torch does when a python number meets an fp32 tensor::

    param *= 1 - lr * wd
    m = m.lerp(g, 1 - b1)                    # fma(w, g - m, m) for w < 0.5, else fma(w - 1, g - m, g)
    v = v * b2 + (1 - b2) * g * g
    denom = sqrt(v) / sqrt(1 - b2**t) + eps
    param += (-lr / (1 - b1**t)) * m / denom

Bias corrections come from the python ``step``, so a call never reads a device scalar (no sync).
"""
from __future__ import annotations

import functools
import os
from typing import Iterator, Optional, Sequence

import torch

from maws_kernels._backend import resolve_backend
from maws_kernels._scenarios import PRECISIONS, CompileShapes, Scenario, dt_name, empty, op_impl

from maws_kernels._triton import tl, triton

_IMPLEMENTED = ("triton", "torch")
_LOW_PRECISION = (torch.bfloat16, torch.float16)
_GRAD_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


# --- config ---------------------------------------------------------------------------------
def _launch_config(device: torch.device) -> tuple[int, int]:
    """(BLOCK, num_warps): a memory-bound elementwise pass, so one fixed config.

    On a GPU 1024 elements per program (8 per thread at 4 warps = two 128-bit loads per fp32
    stream) keeps enough bytes in flight. The interpreter pays ~1 ms per program whatever its
    size, so there a bigger block means fewer programs.
    """
    if device.type != "cuda" or os.environ.get("TRITON_INTERPRET") == "1":
        return 4096, 4
    return 1024, 4


# --- kernels --------------------------------------------------------------------------------
@triton.jit
def _adamw_update(p, g, m, v, decay, lerp_w, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps,
                  LERP_SMALL_W: tl.constexpr):
    """One AdamW step of fp32 values (the grad already upcast and scaled): (param, exp_avg, exp_avg_sq)."""
    p = p * decay
    # torch's lerp (one fma, based at the end the weight is closer to): exact at w = 0 and 1.
    if LERP_SMALL_W:
        m = tl.fma(lerp_w, g - m, m)
    else:
        m = tl.fma(lerp_w - 1.0, g - m, g)
    v = v * beta2 + one_minus_beta2 * g * g  # addcmul order: (value * g) * g
    # sqrt_rn / div_rn: IEEE rounding like torch (tl.sqrt and "/" are approximate on GPU).
    denom = tl.div_rn(tl.sqrt_rn(v), bc2_sqrt) + eps
    p = p + tl.div_rn(neg_step_size * m, denom)  # addcdiv order: (value * m) / denom
    return p, m, v


@triton.jit
def _adamw_fwd_kernel(
    param_ptr,  # (N,) fp32, updated in place
    grad_ptr,  # (N,) fp32 / bf16 / fp16, read only
    exp_avg_ptr,  # (N,) fp32, updated in place
    exp_avg_sq_ptr,  # (N,) fp32, updated in place
    copy_ptr,  # (N,) bf16 / fp16 model copy, written when HAS_COPY (else any valid pointer)
    n_elements,
    grad_scale,  # fp32 multiplier of the grad (1.0 = none; exact)
    decay,  # fp32 1 - lr * weight_decay
    lerp_w,  # fp32 1 - beta1, torch's lerp weight
    beta2,
    one_minus_beta2,
    neg_step_size,  # fp32 -lr / (1 - beta1**step)
    bc2_sqrt,  # fp32 sqrt(1 - beta2**step)
    eps,
    LERP_SMALL_W: tl.constexpr,  # lerp_w < 0.5: torch's lerp picks its first formula
    HAS_COPY: tl.constexpr,
    BLOCK: tl.constexpr,
):
    # The AdamW step (there is no backward). int64 offsets: a 6.5B-param shard passes 2**31.
    pid = tl.program_id(0)
    offs = pid.to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n_elements

    g = tl.load(grad_ptr + offs, mask=mask, other=0.0).to(tl.float32) * grad_scale
    p = tl.load(param_ptr + offs, mask=mask, other=0.0)
    m = tl.load(exp_avg_ptr + offs, mask=mask, other=0.0)
    v = tl.load(exp_avg_sq_ptr + offs, mask=mask, other=0.0)
    p, m, v = _adamw_update(p, g, m, v, decay, lerp_w, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps,
                            LERP_SMALL_W)

    tl.store(param_ptr + offs, p, mask=mask)
    tl.store(exp_avg_ptr + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
    if HAS_COPY:
        tl.store(copy_ptr + offs, p.to(copy_ptr.dtype.element_ty), mask=mask)


@triton.jit
def _adamw_multi_chunk(p_ptr, g_ptr, m_ptr, v_ptr, offs, n, decay, lerp_w, beta2, one_minus_beta2, neg_step_size,
                       bc2_sqrt, eps, LERP_SMALL_W: tl.constexpr, MASKED: tl.constexpr):
    """One chunk of one tensor: masked (the tensor's last chunk) or not (every other one: vector loads)."""
    if MASKED:
        mask = offs < n
        g = tl.load(g_ptr + offs, mask=mask, other=0.0).to(tl.float32)
        p = tl.load(p_ptr + offs, mask=mask, other=0.0)
        m = tl.load(m_ptr + offs, mask=mask, other=0.0)
        v = tl.load(v_ptr + offs, mask=mask, other=0.0)
    else:
        g = tl.load(g_ptr + offs).to(tl.float32)
        p = tl.load(p_ptr + offs)
        m = tl.load(m_ptr + offs)
        v = tl.load(v_ptr + offs)
    p, m, v = _adamw_update(p, g, m, v, decay, lerp_w, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps,
                            LERP_SMALL_W)
    if MASKED:
        tl.store(p_ptr + offs, p, mask=mask)
        tl.store(m_ptr + offs, m, mask=mask)
        tl.store(v_ptr + offs, v, mask=mask)
    else:
        tl.store(p_ptr + offs, p)
        tl.store(m_ptr + offs, m)
        tl.store(v_ptr + offs, v)


@triton.jit
def _adamw_multi_kernel(
    param_ptrs,  # (T,) int64 addresses of fp32 params, updated in place
    grad_ptrs,  # (T,) int64 addresses of grads (GRAD_DTYPE), read only
    exp_avg_ptrs,  # (T,) int64 addresses of fp32 exp_avg, updated in place
    exp_avg_sq_ptrs,  # (T,) int64 addresses of fp32 exp_avg_sq, updated in place
    numels,  # (T,) int64 elements of each tensor
    chunk_tensor,  # (C,) int32: the tensor program c works on
    chunk_start,  # (C,) int64: its first element (a multiple of BLOCK)
    decay, lerp_w, beta2, one_minus_beta2, neg_step_size, bc2_sqrt, eps,
    LERP_SMALL_W: tl.constexpr,
    GRAD_DTYPE: tl.constexpr,
    ALIGNED: tl.constexpr,  # every address is 16-byte aligned (the host checked): vector loads
    BLOCK: tl.constexpr,
):
    # The multi-tensor form (torch's foreach / apex's multi_tensor_apply): one launch for a list of
    # tensors of any sizes, each program one BLOCK-element chunk of one tensor, found from a table.
    pid = tl.program_id(0)
    t = tl.load(chunk_tensor + pid)
    start = tl.multiple_of(tl.load(chunk_start + pid), BLOCK)
    n = tl.load(numels + t)
    p_ptr = tl.load(param_ptrs + t).to(tl.pointer_type(tl.float32))
    g_ptr = tl.load(grad_ptrs + t).to(tl.pointer_type(GRAD_DTYPE))
    m_ptr = tl.load(exp_avg_ptrs + t).to(tl.pointer_type(tl.float32))
    v_ptr = tl.load(exp_avg_sq_ptrs + t).to(tl.pointer_type(tl.float32))
    if ALIGNED:  # addresses read from memory carry no alignment the compiler can see: say it
        p_ptr = tl.multiple_of(p_ptr, 16)
        g_ptr = tl.multiple_of(g_ptr, 16)
        m_ptr = tl.multiple_of(m_ptr, 16)
        v_ptr = tl.multiple_of(v_ptr, 16)
    offs = start + tl.arange(0, BLOCK)
    if start + BLOCK <= n:
        _adamw_multi_chunk(p_ptr, g_ptr, m_ptr, v_ptr, offs, n, decay, lerp_w, beta2, one_minus_beta2, neg_step_size,
                           bc2_sqrt, eps, LERP_SMALL_W, False)
    else:
        _adamw_multi_chunk(p_ptr, g_ptr, m_ptr, v_ptr, offs, n, decay, lerp_w, beta2, one_minus_beta2, neg_step_size,
                           bc2_sqrt, eps, LERP_SMALL_W, True)


# --- launch ---------------------------------------------------------------------------------
def _check_inputs(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    model_copy: Optional[torch.Tensor],
    step: int,
) -> None:
    named = {"param": param, "grad": grad, "exp_avg": exp_avg, "exp_avg_sq": exp_avg_sq}
    if model_copy is not None:
        named["model_copy"] = model_copy
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise ValueError(f"fused_adamw_: {name} must be a tensor, got {type(t).__name__}")
        if t.dim() != 1:
            raise ValueError(f"fused_adamw_: {name} must be a flat 1-D buffer, got shape {tuple(t.shape)}; "
                             "flatten it (the ZeRO optimizer keeps one flat buffer per group)")
        if not t.is_contiguous():
            raise ValueError(f"fused_adamw_: {name} must be contiguous; pass a contiguous buffer, not a strided view")
        if t.numel() != param.numel():
            raise ValueError(f"fused_adamw_: {name} has {t.numel()} elements but param has {param.numel()}")
        if t.device != param.device:
            raise ValueError(f"fused_adamw_: {name} must be on the same device as param; "
                             f"got {t.device} and {param.device}")
    for name in ("param", "exp_avg", "exp_avg_sq"):
        if named[name].dtype != torch.float32:
            raise ValueError(f"fused_adamw_: {name} must be float32 (the master copy), got {named[name].dtype}")
    if grad.dtype not in _GRAD_DTYPES:
        raise ValueError(f"fused_adamw_: grad must be one of {_GRAD_DTYPES}, got {grad.dtype}")
    if model_copy is not None and model_copy.dtype not in _LOW_PRECISION:
        raise ValueError(f"fused_adamw_: model_copy must be bfloat16 or float16, got {model_copy.dtype}")
    if isinstance(step, bool) or not isinstance(step, int) or step < 1:
        raise ValueError(f"fused_adamw_: step must be a python int >= 1 (the count after incrementing), got {step!r}")


def _host_scalars(step: int, lr: float, beta1: float, beta2: float, weight_decay: float) -> dict[str, float]:
    """The step's scalars in python double, exactly as torch's single-tensor AdamW forms them."""
    bias_correction1 = 1 - beta1**step
    bias_correction2 = 1 - beta2**step
    return {
        "decay": 1 - lr * weight_decay,
        "lerp_w": 1 - beta1,
        "neg_step_size": -(lr / bias_correction1),
        "bc2_sqrt": bias_correction2**0.5,
    }


def _fused_adamw_launch(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    model_copy: Optional[torch.Tensor],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: Optional[float],
) -> None:
    n = param.numel()
    if n == 0:
        return
    s = _host_scalars(step, lr, beta1, beta2, weight_decay)
    block, num_warps = _launch_config(param.device)
    grid = (triton.cdiv(n, block),)
    _adamw_fwd_kernel[grid](
        param, grad, exp_avg, exp_avg_sq, model_copy if model_copy is not None else param, n,
        1.0 if grad_scale is None else float(grad_scale), s["decay"], s["lerp_w"], beta2, 1 - beta2,
        s["neg_step_size"], s["bc2_sqrt"], eps,
        LERP_SMALL_W=s["lerp_w"] < 0.5, HAS_COPY=model_copy is not None, BLOCK=block, num_warps=num_warps,
    )


_TL_DTYPES = {torch.float32: tl.float32, torch.bfloat16: tl.bfloat16, torch.float16: tl.float16}


@functools.lru_cache(maxsize=64)
def _chunk_table(numels: tuple[int, ...], block: int, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    """(tensor index, first element) of every BLOCK-element chunk of tensors of these sizes, on ``device``.

    Cached: a model's parameter list is the same every step, so the table is built (and copied to
    the GPU) once, not per step.
    """
    counts = [-(-n // block) for n in numels]
    tensor = torch.repeat_interleave(torch.arange(len(numels), dtype=torch.int32), torch.tensor(counts))
    first = torch.cat([torch.arange(c, dtype=torch.int64) * block for c in counts])
    return tensor.to(device), first.to(device)


def _fused_adamw_multi_launch(params, grads, exp_avgs, exp_avg_sqs, step, lr, beta1, beta2, eps, weight_decay) -> None:
    keep = [i for i, p in enumerate(params) if p.numel()]
    if not keep:
        return
    device = params[keep[0]].device
    block, _ = _launch_config(device)
    numels = tuple(params[i].numel() for i in keep)
    chunk_tensor, chunk_start = _chunk_table(numels, block, device)
    # The four address tables in one host tensor, one copy to the device (pinned, so it does not block).
    table = torch.tensor([[ts[i].data_ptr() for i in keep] for ts in (params, grads, exp_avgs, exp_avg_sqs)],
                         dtype=torch.int64)
    if device.type == "cuda":
        table = table.pin_memory().to(device, non_blocking=True)
    aligned = all(t.data_ptr() % 16 == 0 for ts in (params, grads, exp_avgs, exp_avg_sqs) for t in ts)
    _adamw_multi_launch_tables(tuple(table.unbind(0)), _device_sizes(numels, device), chunk_tensor, chunk_start,
                               grads[keep[0]].dtype, step, lr, beta1, beta2, eps, weight_decay, aligned)


def _adamw_multi_launch_tables(addresses: tuple[torch.Tensor, ...], sizes: torch.Tensor, chunk_tensor: torch.Tensor,
                               chunk_start: torch.Tensor, grad_dtype: torch.dtype, step: int, lr: float, beta1: float,
                               beta2: float, eps: float, weight_decay: float, aligned: bool) -> None:
    """The launch itself, from the device tables: (param, grad, exp_avg, exp_avg_sq) address tables, sizes,
    the chunk table (split out so the compile check can feed it fake ones)."""
    block, num_warps = _launch_config(sizes.device)
    s = _host_scalars(step, lr, beta1, beta2, weight_decay)
    _adamw_multi_kernel[(chunk_tensor.numel(),)](
        *addresses, sizes, chunk_tensor, chunk_start,
        s["decay"], s["lerp_w"], beta2, 1 - beta2, s["neg_step_size"], s["bc2_sqrt"], eps,
        LERP_SMALL_W=s["lerp_w"] < 0.5, GRAD_DTYPE=_TL_DTYPES[grad_dtype], ALIGNED=aligned, BLOCK=block,
        num_warps=num_warps,
    )


@functools.lru_cache(maxsize=64)
def _device_sizes(numels: tuple[int, ...], device: torch.device) -> torch.Tensor:
    return torch.tensor(numels, dtype=torch.int64, device=device)


# --- custom op (torch.compile sees one opaque in-place op, never the Triton launch) ---------
# typing.Optional rather than "X | None": schema inference must read it on torch 2.11 and 2.13.
@torch.library.custom_op("maws_kernels::fused_adamw", mutates_args=("param", "exp_avg", "exp_avg_sq", "model_copy"))
def _fused_adamw_op(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    model_copy: Optional[torch.Tensor],
    step: int,
    lr: float,
    beta1: float,
    beta2: float,
    eps: float,
    weight_decay: float,
    grad_scale: Optional[float],
) -> None:
    _fused_adamw_launch(param, grad, exp_avg, exp_avg_sq, model_copy, step, lr, beta1, beta2, eps,
                        weight_decay, grad_scale)


@_fused_adamw_op.register_fake
def _(param, grad, exp_avg, exp_avg_sq, model_copy, step, lr, beta1, beta2, eps, weight_decay, grad_scale) -> None:
    return None  # in place: no outputs to describe


# --- public ---------------------------------------------------------------------------------
def fused_adamw_(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    model_copy: torch.Tensor | None = None,
    grad_scale: float | None = None,
    backend: str | None = None,
) -> None:
    """One AdamW step over a flat shard, in place; matches ``torch.optim.AdamW`` step for step.

    Args:
        param: (N,) fp32 master weights, updated in place.
        grad: (N,) fp32, bf16 or fp16 gradient (upcast to fp32 on load; never modified).
        exp_avg: (N,) fp32 first moment, updated in place.
        exp_avg_sq: (N,) fp32 second moment, updated in place.
        step: 1-based step count AFTER incrementing (python int; bias corrections use it on the
            host, so the call never syncs).
        lr: learning rate of this step (python float).
        beta1: first-moment decay.
        beta2: second-moment decay.
        eps: added to the bias-corrected sqrt of the second moment.
        weight_decay: decoupled weight decay (param *= 1 - lr * weight_decay).
        model_copy: optional (N,) bf16/fp16 buffer, overwritten with the updated param cast to
            its dtype (round to nearest on GPU; the Triton interpreter truncates).
        grad_scale: optional multiplier applied to the grad first (1 / accumulation steps, a
            clipping coefficient, an inverse loss scale).
        backend: "triton", "torch" or None (see :func:`maws_kernels.resolve_backend`).

    Raises:
        ValueError: a buffer is not 1-D, contiguous, of param's size, device or allowed dtype,
            or ``step`` is not an int >= 1.
        BackendUnavailableError: the requested backend cannot run here.
    """
    _check_inputs(param, grad, exp_avg, exp_avg_sq, model_copy, step)
    if resolve_backend("fused_adamw", backend, _IMPLEMENTED, param.device) == "triton":
        torch.ops.maws_kernels.fused_adamw(param, grad, exp_avg, exp_avg_sq, model_copy, step, float(lr),
                                           float(beta1), float(beta2), float(eps), float(weight_decay),
                                           None if grad_scale is None else float(grad_scale))
    else:
        fused_adamw_ref(param, grad, exp_avg, exp_avg_sq, step=step, lr=lr, beta1=beta1, beta2=beta2, eps=eps,
                        weight_decay=weight_decay, model_copy=model_copy, grad_scale=grad_scale)


@torch.no_grad()
def fused_adamw_ref(
    param: torch.Tensor,
    grad: torch.Tensor,
    exp_avg: torch.Tensor,
    exp_avg_sq: torch.Tensor,
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    model_copy: torch.Tensor | None = None,
    grad_scale: float | None = None,
) -> None:
    """Reference step in plain torch ops, the same ops as ``torch.optim.AdamW(foreach=False)``.

    Same arguments as :func:`fused_adamw_`. There is no ``upcast`` flag: the state is fp32 and
    the grad is always upcast. With fp32 grads and no ``grad_scale`` it is bit-identical to
    torch's single-tensor AdamW on the same device.
    """
    g = grad.float()  # no copy when already fp32; never written to
    if grad_scale is not None:
        g = g * grad_scale
    s = _host_scalars(step, lr, beta1, beta2, weight_decay)
    if weight_decay != 0:
        param.mul_(s["decay"])
    exp_avg.lerp_(g, s["lerp_w"])
    exp_avg_sq.mul_(beta2).addcmul_(g, g, value=1 - beta2)
    denom = (exp_avg_sq.sqrt() / s["bc2_sqrt"]).add_(eps)
    param.addcdiv_(exp_avg, denom, value=s["neg_step_size"])
    if model_copy is not None:
        model_copy.copy_(param)


def fused_adamw_multi_(
    params: Sequence[torch.Tensor],
    grads: Sequence[torch.Tensor],
    exp_avgs: Sequence[torch.Tensor],
    exp_avg_sqs: Sequence[torch.Tensor],
    *,
    step: int,
    lr: float,
    beta1: float = 0.9,
    beta2: float = 0.999,
    eps: float = 1e-8,
    weight_decay: float = 0.0,
    backend: str | None = None,
) -> None:
    """One AdamW step of a list of tensors of any shapes and sizes, in one launch (multi-tensor).

    What :class:`maws_kernels.optim.FusedAdamW` runs for a param group: the same math as
    :func:`fused_adamw_`, but each of the four lists may hold tensors of any shape, each
    contiguous; params and moments fp32, grads fp32 / bf16 / fp16, all grads of one call one dtype,
    everything on one device. The "torch" backend is :func:`fused_adamw_ref` per tensor.

    Raises:
        ValueError: lists of different lengths, mismatched shapes, dtypes or devices, or a
            non-contiguous tensor (named by its index).
    """
    n = len(params)
    if not (len(grads) == len(exp_avgs) == len(exp_avg_sqs) == n):
        raise ValueError(f"fused_adamw_multi_: {n} params, {len(grads)} grads, {len(exp_avgs)} exp_avgs and "
                         f"{len(exp_avg_sqs)} exp_avg_sqs: one of each per tensor")
    if n == 0:
        return
    device = params[0].device
    for i, (p, g, m, v) in enumerate(zip(params, grads, exp_avgs, exp_avg_sqs)):
        for name, t in (("param", p), ("grad", g), ("exp_avg", m), ("exp_avg_sq", v)):
            if t.shape != p.shape or t.device != device or not t.is_contiguous():
                raise ValueError(f"fused_adamw_multi_: {name} {i} must be contiguous, of shape {tuple(p.shape)} on "
                                 f"{device}; got shape {tuple(t.shape)} on {t.device}, contiguous={t.is_contiguous()}")
        if p.dtype != torch.float32 or m.dtype != torch.float32 or v.dtype != torch.float32:
            raise ValueError(f"fused_adamw_multi_: param / exp_avg / exp_avg_sq {i} must be fp32 (keep fp32 "
                             f"master weights and train under autocast); got {p.dtype}, {m.dtype}, {v.dtype}")
        if g.dtype not in _GRAD_DTYPES or g.dtype != grads[0].dtype:
            raise ValueError(f"fused_adamw_multi_: grad {i} is {g.dtype}; one of {_GRAD_DTYPES}, the same for every "
                             f"tensor of a call (grad 0 is {grads[0].dtype})")
    if step < 1:
        raise ValueError(f"fused_adamw_multi_: step must be >= 1 (the step being taken), got {step}")
    backend = resolve_backend("fused_adamw_multi_", backend, _IMPLEMENTED, device)
    if backend == "torch":
        for p, g, m, v in zip(params, grads, exp_avgs, exp_avg_sqs):
            fused_adamw_ref(p.view(-1), g.view(-1), m.view(-1), v.view(-1), step=step, lr=lr, beta1=beta1,
                            beta2=beta2, eps=eps, weight_decay=weight_decay)
        return
    _fused_adamw_multi_launch(list(params), list(grads), list(exp_avgs), list(exp_avg_sqs), step, lr, beta1, beta2,
                              eps, weight_decay)


# --- compile scenarios: what maws_kernels.compile_check compiles (see _scenarios.py) ---------------
def _compile_flat(dev: str, n: int, grad_dtype: torch.dtype, copy_dtype: Optional[torch.dtype], beta1: float) -> None:
    p, ea, eas = (empty((n,), torch.float32, dev) for _ in range(3))
    copy = empty((n,), copy_dtype, dev) if copy_dtype is not None else None
    op_impl(_fused_adamw_op)(p, empty((n,), grad_dtype, dev), ea, eas, copy, 1, 1.5e-4, beta1, 0.95, 1e-8, 0.05, None)


def _compile_multi(dev: str, numels: tuple[int, ...], grad_dtype: torch.dtype, beta1: float, aligned: bool) -> None:
    """FusedAdamW's multi-tensor step over tensors of these sizes (one param group), from fake tables."""
    block, _ = _launch_config(torch.device("cuda"))
    chunks = sum(-(-n // block) for n in numels)
    tables = tuple(empty((len(numels),), torch.int64, dev) for _ in range(4))
    _adamw_multi_launch_tables(tables, empty((len(numels),), torch.int64, dev), empty((chunks,), torch.int32, dev),
                               empty((chunks,), torch.int64, dev), grad_dtype, 1, 1.5e-4, beta1, 0.95, 1e-8, 0.05,
                               aligned)


def compile_scenarios(shapes: CompileShapes) -> Iterator[Scenario]:
    """One flat fp32 master shard (grads in fp32 and each activation dtype, with and without a model
    copy) and the multi-tensor step over each parameter set; beta1 < 0.5 flips torch's lerp formula
    (LERP_SMALL_W); a tensor off a 16-byte boundary takes the scalar-load path."""
    grads = sorted({PRECISIONS[p][0] for p in shapes.precisions} | {torch.float32}, key=str)
    for n in shapes.flat_numels:
        for g in grads:
            for copy in (None, torch.bfloat16, torch.float16) if shapes.variants else (None, torch.bfloat16):
                for beta1 in (0.9, 0.3):
                    yield Scenario(f"n={n} grad={dt_name(g)} copy={copy and dt_name(copy)} beta1={beta1}",
                                   _compile_flat, (n, g, copy, beta1))
    for name, numels in shapes.param_sets:
        for g in grads:
            for beta1 in (0.9, 0.3):
                yield Scenario(f"multi {name} tensors={len(numels)} grad={dt_name(g)} beta1={beta1}", _compile_multi,
                               (numels, g, beta1, True))
            yield Scenario(f"multi {name} tensors={len(numels)} grad={dt_name(g)} unaligned", _compile_multi,
                           (numels, g, 0.9, False))
