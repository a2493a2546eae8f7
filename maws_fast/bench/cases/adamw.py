"""Benchmark cases for the fused AdamW step: one flat buffer per model, its trainable MAE params.

Each case is one optimizer step over a flat fp32 master (param, exp_avg, exp_avg_sq), grads in
the case dtype and a bf16 model copy, as the ZeRO optimizer runs it on one unsharded rank.
Minimum bytes: read + write param, exp_avg and exp_avg_sq (24 B/elem), read the grad, write the
copy: 28 B/elem with bf16 grads, 30 with fp32. No backward.

Providers: "ours" is ``fused_adamw_(backend="triton")``. "torch" is torch's own fused AdamW
kernel ``torch._fused_adamw_`` on the flat tensor (what ``AdamW(fused=True)`` calls; CUDA), or
the functional ``torch.optim.adamw.adamw`` on a CPU, then an explicit copy into the bf16 buffer
so both do the same work. torch's fused kernel needs grads of the param dtype, so with bf16
grads "torch" also pays for upcasting them.
"""
from __future__ import annotations

import functools
from typing import Iterator

import torch
from torch.optim.adamw import adamw as functional_adamw

from maws_fast.bench.kernels import Case, MaeShape, dtype_name
from maws_kernels import available_backends
from maws_kernels.adamw import _IMPLEMENTED, fused_adamw_

_STEP, _LR, _WD = 10, 1e-4, 0.05  # a mid-warmup step; values do not change the work done
LIGER_NA = "Liger has no optimizer kernel"


@functools.lru_cache(maxsize=None)
def trainable_params(model: str) -> int:
    """Trainable parameter count of the preset's MAE (encoder + decoder), built on "meta"."""
    from maws_fast.config import model_preset
    from maws_fast.models import build_mae

    with torch.device("meta"):
        net = build_mae(model_preset(model))
    # The fixed sin-cos position embeddings have no grad, so they have no optimizer state.
    return sum(p.numel() for p in net.parameters() if p.requires_grad)


def _ours(param, grad, exp_avg, exp_avg_sq, model_copy, step_t):
    fused_adamw_(param, grad, exp_avg, exp_avg_sq, step=_STEP, lr=_LR, weight_decay=_WD, model_copy=model_copy,
                 backend="triton")
    return param


def _torch(param, grad, exp_avg, exp_avg_sq, model_copy, step_t):
    g = grad if grad.dtype == param.dtype else grad.float()  # torch's AdamW kernels want matching dtypes
    if param.is_cuda:
        # Reads step from step_t and leaves it alone (the optimizer increments it beforehand).
        torch._fused_adamw_([param], [g], [exp_avg], [exp_avg_sq], [], [step_t], lr=_LR, beta1=0.9, beta2=0.999,
                            weight_decay=_WD, eps=1e-8, amsgrad=False, maximize=False)
    else:
        # Single-tensor path: increments step_t itself (harmless here: the work per call is the same).
        functional_adamw([param], [g], [exp_avg], [exp_avg_sq], [], [step_t], foreach=False, amsgrad=False,
                         beta1=0.9, beta2=0.999, lr=_LR, weight_decay=_WD, eps=1e-8, maximize=False)
    model_copy.copy_(param)
    return param


def cases(shapes: list[MaeShape], dtype: torch.dtype, device) -> Iterator[Case]:
    """One AdamW step over each model's trainable parameter count, grads in ``dtype``."""
    device = torch.device(device)
    fns = {"torch": _torch}
    if "triton" in available_backends("fused_adamw", _IMPLEMENTED, device):
        fns = {"ours": _ours, **fns}
    for model in dict.fromkeys(s.model for s in shapes):  # batch size does not matter here
        n = trainable_params(model)
        param = 0.02 * torch.randn(n, device=device)
        grad = (1e-3 * torch.randn(n, device=device)).to(dtype)
        exp_avg = 1e-3 * torch.randn(n, device=device)
        exp_avg_sq = 1e-6 * torch.rand(n, device=device)
        model_copy = param.to(torch.bfloat16)
        step_t = torch.tensor(float(_STEP), device=device)  # torch's per-param step (fp32, on device)
        nbytes = n * (3 * 2 * 4 + grad.element_size() + model_copy.element_size())
        yield Case(
            op="adamw", shape=f"{model} {n / 1e6:.1f}M params", dtype=dtype_name(dtype),
            args=(param, grad, exp_avg, exp_avg_sq, model_copy, step_t), fns=fns, bytes_fwd=nbytes, bytes_bwd=0,
            note="fp32 master + m + v, bf16 model copy", extra={"numel": n}, skip={"liger": LIGER_NA},
        )
