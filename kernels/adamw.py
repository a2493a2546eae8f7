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

import os
from typing import Optional, Sequence

import torch

from maws_kernels._backend import resolve_backend

import triton
import triton.language as tl

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


# --- kernel ---------------------------------------------------------------------------------
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

    tl.store(param_ptr + offs, p, mask=mask)
    tl.store(exp_avg_ptr + offs, m, mask=mask)
    tl.store(exp_avg_sq_ptr + offs, v, mask=mask)
    if HAS_COPY:
        tl.store(copy_ptr + offs, p.to(copy_ptr.dtype.element_ty), mask=mask)


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


# --- a minimal optimizer over flat group buffers ---------------------------------------------
def _per_group(value: float | Sequence[float], n: int, name: str) -> list[float]:
    if isinstance(value, (int, float)):
        return [float(value)] * n
    values = [float(x) for x in value]
    if len(values) != n:
        raise ValueError(f"FlatAdamW: {name} has {len(values)} entries for {n} param groups")
    return values


class FlatAdamW:
    """AdamW over flat fp32 master buffers, one per param group (the core of the ZeRO optimizer).

    It owns the moments and the step count; the caller owns the buffers and hands in one flat
    grad per group. The lr comes with every ``step`` (the schedule lives in the loop), scaled per
    group by ``lr_scale``.

    Args:
        params: flat 1-D fp32 master buffers, one per group; updated in place.
        weight_decay: one value for every group, or one per group (e.g. ``[0.05, 0.0]`` for the
            decay / no-decay split).
        lr_scale: multiplier of the step's lr, one value or one per group.
        betas: (beta1, beta2).
        eps: AdamW epsilon.
        model_copies: optional list with one bf16/fp16 buffer (or None) per group, rewritten
            with the updated params after every step.
        backend: passed to :func:`fused_adamw_`.
    """

    def __init__(
        self,
        params: Sequence[torch.Tensor],
        *,
        weight_decay: float | Sequence[float] = 0.0,
        lr_scale: float | Sequence[float] = 1.0,
        betas: tuple[float, float] = (0.9, 0.999),
        eps: float = 1e-8,
        model_copies: Sequence[torch.Tensor | None] | None = None,
        backend: str | None = None,
    ):
        self.params = list(params)
        n = len(self.params)
        self.weight_decays = _per_group(weight_decay, n, "weight_decay")
        self.lr_scales = _per_group(lr_scale, n, "lr_scale")
        self.model_copies = list(model_copies) if model_copies is not None else [None] * n
        if len(self.model_copies) != n:
            raise ValueError(f"FlatAdamW: model_copies has {len(self.model_copies)} entries for {n} param groups")
        self.betas, self.eps, self.backend = betas, eps, backend
        self.exp_avgs = [torch.zeros_like(p) for p in self.params]
        self.exp_avg_sqs = [torch.zeros_like(p) for p in self.params]
        self.step_count = 0  # python int: bias corrections never touch the device

    @torch.no_grad()
    def step(self, grads: Sequence[torch.Tensor], lr: float, grad_scale: float | None = None) -> None:
        """One AdamW step of every group with ``grads`` (one flat buffer per group) at ``lr``."""
        if len(grads) != len(self.params):
            raise ValueError(f"FlatAdamW.step: got {len(grads)} grads for {len(self.params)} param groups")
        self.step_count += 1
        for i, (p, g) in enumerate(zip(self.params, grads)):
            fused_adamw_(p, g, self.exp_avgs[i], self.exp_avg_sqs[i], step=self.step_count,
                         lr=lr * self.lr_scales[i], beta1=self.betas[0], beta2=self.betas[1], eps=self.eps,
                         weight_decay=self.weight_decays[i], model_copy=self.model_copies[i],
                         grad_scale=grad_scale, backend=self.backend)

    def state_dict(self) -> dict:
        """Step count and moments (tensors shared, not copied: save or clone them before stepping)."""
        return {"step": self.step_count, "exp_avg": list(self.exp_avgs), "exp_avg_sq": list(self.exp_avg_sqs)}

    @torch.no_grad()
    def load_state_dict(self, state: dict) -> None:
        """Restore what :meth:`state_dict` returned, copying into the existing buffers."""
        for name, mine in (("exp_avg", self.exp_avgs), ("exp_avg_sq", self.exp_avg_sqs)):
            theirs = state[name]
            if len(theirs) != len(mine) or any(a.shape != b.shape for a, b in zip(mine, theirs)):
                raise ValueError(f"FlatAdamW.load_state_dict: {name} does not match this optimizer's groups")
            for a, b in zip(mine, theirs):
                a.copy_(b)
        self.step_count = int(state["step"])
