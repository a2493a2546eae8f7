"""``FusedAdamW``: a ``torch.optim.Optimizer`` over the fused AdamW kernel.

It is ``torch.optim.AdamW`` for every user-visible purpose: the same constructor arguments and
defaults, param groups, ``zero_grad``, hooks, LR schedulers, and the same ``state_dict`` format
(per parameter ``step`` as a CPU fp32 scalar, ``exp_avg``, ``exp_avg_sq``; groups with every key
torch's AdamW has, ``decoupled_weight_decay=True`` included), so a checkpoint of one resumes in the
other. The math is torch's single-tensor AdamW (``foreach=False``) op for op: bit-identical on the
"torch" backend, within a few fp32 ulps on the Triton kernel.

Inside, each param group's moments live in one flat fp32 buffer per device (the state's
``exp_avg`` / ``exp_avg_sq`` are views of it), and a step is one multi-tensor launch per
(device, grad dtype, step count) of the group's params with grads
(:func:`maws_kernels.adamw.fused_adamw_multi_`): one pass over param, grad and both moments.

``lr_scale``: a group may carry an ``lr_scale`` (the layer-wise decay of a fine-tune, as timm's
param groups do). As with timm's schedulers and torch's AdamW, the step uses the group's ``lr``;
:meth:`FusedAdamW.set_lr` sets every group's ``lr`` to ``lr * lr_scale``, which is what an LR
schedule calls each step. torch's AdamW keeps the key in its groups too, so the pair stays
interchangeable.

Not supported (a clear error, not a silent difference): ``amsgrad``, ``maximize``, sparse grads,
params that are not fp32 (keep fp32 master weights and train under autocast).
"""
from __future__ import annotations

from collections import defaultdict
from contextlib import nullcontext
from typing import Callable, Iterable

import torch

from maws_kernels._backend import BACKENDS, TRITON_ERROR, BackendUnavailableError, missing_triton_message
from maws_kernels.adamw import fused_adamw_multi_

# The keys of torch.optim.AdamW's param groups (torch 2.4 .. 2.13), with the values ours has:
# torch's load_state_dict takes the saved groups' options, so each must mean the same in both.
_TORCH_GROUP_KEYS = {"amsgrad": False, "maximize": False, "foreach": None, "capturable": False,
                     "differentiable": False, "fused": None, "decoupled_weight_decay": True}


class FusedAdamW(torch.optim.Optimizer):
    """AdamW with the fused multi-tensor kernel; a drop-in for ``torch.optim.AdamW``.

    Args:
        params: parameters or param groups (dicts with ``params`` and any of ``lr``, ``betas``,
            ``eps``, ``weight_decay``, ``lr_scale``).
        lr, betas, eps, weight_decay, amsgrad, maximize: as ``torch.optim.AdamW`` (same order and
            defaults; ``amsgrad`` and ``maximize`` must stay False).
        foreach, fused: accepted for a drop-in and ignored: the step is always the multi-tensor
            kernel (or its torch reference).
        capturable, differentiable: must stay False (not supported).
        backend: maws_kernels backend of the step ("triton" | "torch" | None = best for the
            params' device).
    """

    def __init__(self, params: Iterable, lr: float = 1e-3, betas: tuple[float, float] = (0.9, 0.999),
                 eps: float = 1e-8, weight_decay: float = 1e-2, amsgrad: bool = False, *, maximize: bool = False,
                 foreach: bool | None = None, capturable: bool = False, differentiable: bool = False,
                 fused: bool | None = None, backend: str | None = None):
        if backend is not None and backend not in BACKENDS:
            raise ValueError(f"FusedAdamW: unknown backend {backend!r}; choose one of {BACKENDS} or None")
        if backend == "triton" and TRITON_ERROR is not None:  # say so now, not at the first step
            raise BackendUnavailableError(missing_triton_message("FusedAdamW(backend='triton')"))
        if capturable:
            raise ValueError("FusedAdamW: capturable=True (CUDA-graph capture of the step) is not supported; use "
                             "torch.optim.AdamW(capturable=True)")
        self.backend = backend
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, **_TORCH_GROUP_KEYS, lr_scale=1.0)
        defaults.update(amsgrad=amsgrad, maximize=maximize, differentiable=differentiable)
        self._flat: dict[int, tuple] = {}  # group index -> (param ids, moment addresses, buffers)
        super().__init__(params, defaults)

    # --- copy / pickle: the base class keeps defaults, state and groups; ours also the backend ----------
    def __getstate__(self) -> dict:
        return {**super().__getstate__(), "backend": self.backend}

    def __setstate__(self, state: dict) -> None:
        self.backend = state.pop("backend", None)
        super().__setstate__(state)
        self._flat = {}

    # --- checks -------------------------------------------------------------------------------------
    @staticmethod
    def _check_group(group: dict, index: int) -> None:
        lr, (b1, b2), eps, wd = group["lr"], group["betas"], group["eps"], group["weight_decay"]
        if isinstance(lr, torch.Tensor):
            lr = float(lr)
        if not lr >= 0.0:
            raise ValueError(f"FusedAdamW: invalid lr {lr} in param group {index}")
        if not (0.0 <= b1 < 1.0 and 0.0 <= b2 < 1.0):
            raise ValueError(f"FusedAdamW: invalid betas {group['betas']} in param group {index}")
        if not eps >= 0.0 or not wd >= 0.0:
            raise ValueError(f"FusedAdamW: invalid eps {eps} or weight_decay {wd} in param group {index}")
        for key in ("amsgrad", "maximize", "differentiable"):
            if group.get(key):
                raise ValueError(f"FusedAdamW: {key}=True (param group {index}) is not supported; use "
                                 "torch.optim.AdamW for it")
        if not group.get("decoupled_weight_decay", True):
            raise ValueError(f"FusedAdamW: param group {index} has decoupled_weight_decay=False (an Adam state "
                             "with L2 decay, not AdamW); load it into torch.optim.Adam instead")
        for i, p in enumerate(group["params"]):
            if not _dense(p):
                raise ValueError(f"FusedAdamW: param {i} of group {index} (shape {tuple(p.shape)}, strides "
                                 f"{p.stride()}) is neither contiguous nor channels-last: make it contiguous")
            if p.dtype != torch.float32:
                raise ValueError(f"FusedAdamW: param {i} of group {index} is {p.dtype}; the fused step keeps fp32 "
                                 "params (master weights): keep the model in fp32 and train under autocast, or use "
                                 "torch.optim.AdamW")

    def add_param_group(self, param_group: dict) -> None:
        super().add_param_group(param_group)
        try:
            self._check_group(self.param_groups[-1], len(self.param_groups) - 1)
        except ValueError:
            self.param_groups.pop()  # a refused group leaves the optimizer as it was
            raise

    # --- the schedule ---------------------------------------------------------------------------------
    def set_lr(self, lr: float) -> None:
        """Every group's ``lr`` to ``lr * lr_scale`` (a group without ``lr_scale`` gets ``lr``)."""
        for group in self.param_groups:
            group["lr"] = lr * group.get("lr_scale", 1.0)

    # --- flat moments ---------------------------------------------------------------------------------
    def _flat_moments(self, index: int, group: dict) -> None:
        """Make the state of the group's params that have a grad or state views of one flat fp32 buffer
        per device (zero state where there is none, the values kept where there is). Params that never
        got a grad get no state, as with torch's AdamW (a frozen backbone costs no moments).

        Channels-last params keep moments of their own layout outside the flat buffer: the kernel
        walks raw memory, which is elementwise-correct when param, grad and moments share strides.
        """
        members = [p for p in group["params"] if p.grad is not None or "exp_avg" in self.state.get(p, ())]
        ids = tuple(id(p) for p in members)
        known = self._flat.get(index)
        if known is not None and known[0] == ids and all(
                self.state[p]["exp_avg"].data_ptr() == ptr for p, ptr in zip(members, known[1])):
            return
        by_device = defaultdict(list)
        for p in members:
            by_device[p.device].append(p)
        buffers = []
        for device, params in by_device.items():
            flat = [p for p in params if p.is_contiguous()]
            # each view starts on a 16-byte boundary, so the kernel's loads can be 128-bit wide
            spans = [-(-p.numel() // 4) * 4 for p in flat]
            m = torch.zeros(sum(spans), dtype=torch.float32, device=device)
            v = torch.zeros(sum(spans), dtype=torch.float32, device=device)
            buffers.append((m, v))
            views, off = {}, 0
            for p, span in zip(flat, spans):
                n = p.numel()
                views[id(p)] = (m[off:off + n].view(p.shape), v[off:off + n].view(p.shape))
                off += span
            for p in params:
                mv, vv = views.get(id(p)) or (torch.zeros_like(p, memory_format=torch.preserve_format),
                                              torch.zeros_like(p, memory_format=torch.preserve_format))
                st = self.state[p]
                if "exp_avg" in st:
                    mv.copy_(st["exp_avg"])
                    vv.copy_(st["exp_avg_sq"])
                st["exp_avg"], st["exp_avg_sq"] = mv, vv
                st["step"] = torch.tensor(float(st.get("step", 0.0)), dtype=torch.float32)  # CPU, as torch's
        self._flat[index] = (ids, [self.state[p]["exp_avg"].data_ptr() for p in members], buffers)

    def load_state_dict(self, state_dict: dict) -> None:
        """Load a state of this class or of ``torch.optim.AdamW`` (its moments are copied into the
        flat buffers at the next step)."""
        super().load_state_dict(state_dict)
        for index, group in enumerate(self.param_groups):
            for key, value in _TORCH_GROUP_KEYS.items():
                group.setdefault(key, value)
            group.setdefault("lr_scale", 1.0)
            self._check_group(group, index)
        self._flat.clear()

    # --- the step -------------------------------------------------------------------------------------
    @torch.no_grad()
    def step(self, closure: Callable[[], float] | None = None):
        """One AdamW step of every param with a grad (params without one are left as they are)."""
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for index, group in enumerate(self.param_groups):
            self._flat_moments(index, group)
            b1, b2 = group["betas"]
            lr = float(group["lr"])
            buckets = defaultdict(lambda: ([], [], [], []))
            for p in group["params"]:
                g = p.grad
                if g is None:
                    continue
                if g.is_sparse:
                    raise ValueError("FusedAdamW does not support sparse gradients; use torch.optim.SparseAdam")
                st = self.state[p]
                st["step"] += 1
                if g.stride() != p.stride():  # the kernel walks raw memory: the grad in the param's layout
                    g = torch.empty_like(p, dtype=g.dtype).copy_(g)
                lists = buckets[(p.device, g.dtype, int(st["step"].item()))]
                for lst, t in zip(lists, (p, g, st["exp_avg"], st["exp_avg_sq"])):
                    lst.append(_raw(t))
            for (device, _, step), (ps, gs, ms, vs) in buckets.items():
                with torch.cuda.device(device) if device.type == "cuda" else nullcontext():
                    fused_adamw_multi_(ps, gs, ms, vs, step=step, lr=lr, beta1=b1, beta2=b2, eps=group["eps"],
                                       weight_decay=group["weight_decay"], backend=self.backend)
        return loss


def _dense(t: torch.Tensor) -> bool:
    """Contiguous in the standard or a channels-last layout: its elements fill its memory exactly."""
    return t.is_contiguous() or (t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last)) or (
        t.dim() == 5 and t.is_contiguous(memory_format=torch.channels_last_3d))


def _raw(t: torch.Tensor) -> torch.Tensor:
    """A dense tensor's memory as a 1-D view (layout-free: what an elementwise kernel walks)."""
    return t.view(-1) if t.is_contiguous() else t.as_strided((t.numel(),), (1,))

