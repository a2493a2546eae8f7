"""The data-parallel engines and :func:`build_engine`, the lower-level builder of one.

Three engines implement :class:`Engine`, the interface the training loop and the benchmarks use:

* ``ours``  -- :class:`~maws_fast.parallel.zero.ZeroEngine`, ZeRO stage 0-3 on flat buckets;
* ``fsdp2`` -- :class:`FSDP2Engine`: PyTorch's ``fully_shard`` per block + root (our baseline);
* ``ddp``   -- :class:`DDPEngine`: PyTorch's DistributedDataParallel.

An engine is the LAST step of :func:`maws_fast.train.parallelize.parallelize`, which applies
tensor parallelism, activation checkpointing and compile to the network first (torchtitan's
order; that function lives in the train layer because it composes this package with the models').
:func:`build_engine` takes what it needs as data: the validated
:class:`~maws_fast.parallel.mesh.ParallelLayout` and the :class:`AdamWSpec` the engine owns.

An objective is a module whose ``forward(imgs, targets, step, micro, accum)`` returns the loss and
whose ``model`` attribute is the network; every engine names parameters relative to ``model``
(timm keys), so checkpoints look the same whichever engine wrote them. The optimizer's parameter
groups (weight decay per group) are the caller's: the engines apply them as given.
"""
from __future__ import annotations

import contextlib
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Protocol, runtime_checkable

import torch
import torch.distributed as dist
import torch.nn as nn

from maws_fast.parallel.mesh import Mesh, ParallelLayout
from maws_fast.parallel.tensor import Piece, tp_layout, transformer_blocks
from maws_fast.parallel.zero import ZeroEngine

# A parameter group by name: (its options, e.g. {"weight_decay": 0.05}, the names of its parameters).
# Names survive tensor parallelism, which replaces the split Linear layers and their parameters.
NamedGroups = list[tuple[dict, list[str]]]


@runtime_checkable
class Engine(Protocol):
    """What the training loop needs of a data-parallel engine.

    Attributes:
        name: ``ours`` | ``fsdp2`` | ``ddp`` (recorded in checkpoints).
        objective: what training calls for the loss: ``objective(imgs, targets, step, micro, accum)``
            (the objective handed to :func:`build_engine`; for DDP over several ranks, DDP's wrapper of it).
        model: the network, ``objective.model`` of the objective handed in (TP-split, sharded in place).
        step_count: optimizer steps taken (AdamW's bias correction; saved in checkpoints).
    """

    name: str
    objective: nn.Module
    model: nn.Module
    step_count: int

    def zero_grad(self) -> None:
        """Start an optimizer step: clear the gradients (and, ZeRO-3, gather the root parameters)."""
        ...

    def backward(self, loss: torch.Tensor) -> None:
        """Backward of one micro-batch's loss; gradients are reduced as they are produced unless in no_sync."""
        ...

    def no_sync(self) -> contextlib.AbstractContextManager:
        """Micro-batches before the last of a step: gradients accumulate locally, nothing is communicated."""
        ...

    def step(self, lr: float, clip_grad: float | None = None) -> torch.Tensor | None:
        """Finish the gradient reduction, clip to ``clip_grad`` (global norm) and take one AdamW step at ``lr``.

        Returns the global gradient norm as a device tensor when clipping (no host sync), else None.
        """
        ...

    def memory_report(self) -> dict[str, int]:
        """Persistent bytes on this rank: ``params``, ``grads``, ``optim``."""
        ...

    def pieces(self) -> list[Piece]:
        """What this rank writes to a sharded checkpoint (every element by exactly one rank)."""
        ...

    def load_pieces(self) -> list[Piece]:
        """What this rank needs from a checkpoint."""
        ...

    def shard_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        """``{key: {"param", "exp_avg", "exp_avg_sq"}}`` (1-D) of :meth:`pieces`."""
        ...

    def load_shard_tensors(self, tensors: dict[str, dict[str, torch.Tensor]], step_count: int | None) -> None:
        """Load :meth:`load_pieces`' tensors; ``step_count`` None loads weights only."""
        ...

    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trainable parameter in fp32, DP-gathered (still TP-local), by name. Collective."""
        ...

    def close(self) -> None:
        """Remove hooks; the engine is not used after this."""
        ...


# What a group may set: every engine applies these alike (lr and betas are the engine's, for all groups;
# a group's lr is the step's lr times its lr_scale, the layer-wise decay of a fine-tune).
GROUP_OPTIONS = ("weight_decay", "lr_scale", "name")


def named_groups(model: nn.Module, param_groups: list[dict]) -> NamedGroups:
    """torch-style param groups of ``model`` by parameter name; every trainable parameter in exactly one.

    Raises:
        ValueError: a group holds a tensor that is not a trainable parameter of ``model``, a parameter
            is in two groups, a trainable parameter is in none (an engine trains all of them), or a group
            sets an option other than :data:`GROUP_OPTIONS` (ours would ignore it where torch's AdamW
            would not).
    """
    names = {id(p): n for n, p in model.named_parameters() if p.requires_grad}
    out, seen = [], set()
    for g in param_groups:
        other = sorted(set(g) - {"params", *GROUP_OPTIONS})
        if other:
            raise ValueError(f"param group options {other} are not supported by the engines; a group sets only "
                             f"{GROUP_OPTIONS} (lr, betas and eps are the engine's: AdamWSpec and step(), for every group)")
        group_names = []
        for p in g["params"]:
            n = names.get(id(p))
            if n is None:
                raise ValueError("param_groups hold a tensor that is not a trainable parameter of objective.model")
            if n in seen:
                raise ValueError(f"parameter {n!r} is in two param groups")
            seen.add(n)
            group_names.append(n)
        out.append(({k: v for k, v in g.items() if k != "params"}, group_names))
    missing = [n for n in names.values() if n not in seen]
    if missing:
        raise ValueError(f"trainable parameters {missing[:4]} ({len(missing)} in all) are in no param group; every "
                         "engine trains all of them: put them in a group (weight_decay 0 for none)")
    return out


@dataclass(frozen=True)
class AdamWSpec:
    """The AdamW an engine owns: its parameter groups and constants (the lr comes with each step).

    The groups are held by parameter name (timm keys), not by tensor: tensor parallelism replaces
    the split layers' parameters, names survive. Build it with :meth:`of` before parallelizing.

    Attributes:
        groups: ``[(options, parameter names)]`` (see :func:`named_groups`).
        betas, eps: AdamW's constants, for every group.
    """

    groups: NamedGroups
    betas: tuple[float, float] = (0.9, 0.999)
    eps: float = 1e-8

    @classmethod
    def of(cls, model: nn.Module, param_groups: list[dict], betas=(0.9, 0.999), eps: float = 1e-8) -> AdamWSpec:
        """From torch-style ``param_groups`` over ``model``'s trainable parameters (every one in exactly one
        group), each with its ``weight_decay`` (default 0), e.g. :func:`maws_fast.train.optim.param_groups`."""
        return cls(named_groups(model, param_groups), tuple(betas), eps)


def _even_range(n: int, rank: int, world: int) -> tuple[int, int]:
    c = -(-n // world)
    return min(n, rank * c), min(n, (rank + 1) * c)


def _local(t: torch.Tensor) -> torch.Tensor:
    """This rank's shard of an FSDP2 DTensor; a plain tensor as it is."""
    return t.to_local() if hasattr(t, "to_local") else t


class _TorchEngine:
    """What DDP and FSDP2 share: ``torch.optim.AdamW`` (foreach; fused on CUDA) over the given groups,
    torch's clip_grad_norm_, and the sharded-checkpoint interface over the optimizer's state."""

    name = ""

    def __init__(self, objective: nn.Module, model: nn.Module, mesh: Mesh, groups: NamedGroups, betas, eps: float,
                 device: torch.device):
        # objective: what training calls (DDP's wrapper for DDP); model: the network, parameters named from it
        self.objective, self.model, self.mesh, self.device = objective, model, mesh, device
        named = dict(self.model.named_parameters())
        torch_groups = [{**opts, "params": [named[n] for n in names]} for opts, names in groups]
        kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
        # weight_decay=0 is what a group without one gets (torch's AdamW default would be 0.01)
        self.optimizer = torch.optim.AdamW(torch_groups, lr=0.0, betas=tuple(betas), eps=eps, weight_decay=0.0, **kwargs)
        self.params = [p for p in self.model.parameters() if p.requires_grad]

    # --- what DDP and FSDP2 do differently ---------------------------------------------------------
    def _range(self, p: nn.Parameter, for_load: bool) -> tuple[int, int]:
        """The element range of ``p`` this rank writes (or, ``for_load``, reads) in a sharded checkpoint."""
        raise NotImplementedError

    def _held(self, t: torch.Tensor, s: int, e: int) -> torch.Tensor:
        """Elements ``[s, e)`` of a parameter-shaped tensor as this rank holds it."""
        raise NotImplementedError

    # --- the Engine interface ------------------------------------------------------------------------
    @property
    def step_count(self) -> int:
        for st in self.optimizer.state.values():
            return int(st["step"])
        return 0

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    def step(self, lr: float, clip_grad: float | None = None):
        for g in self.optimizer.param_groups:
            g["lr"] = lr * g.get("lr_scale", 1.0)
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip_grad) if clip_grad is not None else None
        self.optimizer.step()
        return norm

    def memory_report(self) -> dict[str, int]:
        nb = lambda t: 0 if t is None else _local(t).numel() * _local(t).element_size()  # noqa: E731
        return {"params": sum(nb(p) for p in self.params), "grads": sum(nb(p.grad) for p in self.params),
                "optim": sum(nb(v) for st in self.optimizer.state.values() for k, v in st.items() if k != "step")}

    def _ranges(self, for_load: bool) -> Iterator[tuple[str, nn.Parameter, Piece]]:
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                s, e = self._range(p, for_load)
                yield name, p, Piece(name, tuple(p.shape), None, 0, 1, s, e)

    def pieces(self) -> list[Piece]:
        return [pc for _, _, pc in self._ranges(False)]

    def load_pieces(self) -> list[Piece]:
        return [pc for _, _, pc in self._ranges(True)]

    def _state(self, p):
        st = self.optimizer.state[p]
        if "exp_avg" not in st:  # before the first step: create the (zero) state to fill
            st["step"] = torch.tensor(0.0)
            st["exp_avg"] = torch.zeros_like(p, memory_format=torch.preserve_format)
            st["exp_avg_sq"] = torch.zeros_like(p, memory_format=torch.preserve_format)
        return st

    def shard_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for name, p, pc in self._ranges(False):
            st = self._state(p)
            out[name] = {k: self._held(t, pc.start, pc.end)
                         for k, t in (("param", p.detach()), ("exp_avg", st["exp_avg"]), ("exp_avg_sq", st["exp_avg_sq"]))}
        return out

    @torch.no_grad()
    def load_shard_tensors(self, tensors, step_count: int | None) -> None:
        for name, p, _ in self._ranges(True):
            t = tensors[name]
            _local(p.detach()).reshape(-1).copy_(t["param"])
            if step_count is not None:
                st = self._state(p)
                _local(st["exp_avg"]).reshape(-1).copy_(t["exp_avg"])
                _local(st["exp_avg_sq"]).reshape(-1).copy_(t["exp_avg_sq"])
                st["step"] = torch.tensor(float(step_count))

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.model.named_parameters():
            if p.requires_grad:
                out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p.detach()).float().clone()
        return out

    def close(self) -> None:
        pass


class DDPEngine(_TorchEngine):
    """PyTorch's DistributedDataParallel (every rank holds everything; one all-reduce per bucket).

    ``objective`` is DDP's wrapper of the objective over several data-parallel ranks (its forward
    arms the gradient all-reduce), the objective itself in one.
    """

    name = "ddp"

    def __init__(self, objective: nn.Module, mesh: Mesh, layout: ParallelLayout, groups: NamedGroups, betas,
                 eps: float, device: torch.device):
        from torch.nn.parallel import DistributedDataParallel as DDP

        self._wrapped = mesh.dims.dp > 1
        call = DDP(objective, process_group=mesh.dp_group, bucket_cap_mb=layout.bucket_mb,
                   device_ids=[device.index] if device.type == "cuda" else None) if self._wrapped else objective
        super().__init__(call, objective.model, mesh, groups, betas, eps, device)

    @contextlib.contextmanager
    def no_sync(self):
        with self.objective.no_sync() if self._wrapped else contextlib.nullcontext():
            yield

    def _range(self, p, for_load):
        # every rank needs every element, and writes 1/N of each parameter (nothing stored twice)
        return (0, p.numel()) if for_load else _even_range(p.numel(), self.mesh.dp_rank, self.mesh.dims.dp)

    def _held(self, t, s, e):
        return t.reshape(-1)[s:e]


class FSDP2Engine(_TorchEngine):
    """PyTorch's ``fully_shard`` on every transformer block, then on the root (dim-0 shards per rank).

    ``fully_shard`` swaps each block's class for an FSDP subclass in place; the block's activation
    checkpoint mode and compiled body, set before, are instance attributes and stay.
    """

    name = "fsdp2"

    def __init__(self, objective: nn.Module, mesh: Mesh, layout: ParallelLayout, groups: NamedGroups, betas,
                 eps: float, device: torch.device):
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        dmesh = mesh.device_mesh["dp"] if mesh.device_mesh is not None else None
        if dmesh is None:  # one process in a process group (the layout refuses fsdp2 without one)
            from torch.distributed.device_mesh import init_device_mesh

            dmesh = init_device_mesh(device.type, (1,))
        mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16) \
            if layout.param_dtype == "bf16" else MixedPrecisionPolicy()
        for _, blk in transformer_blocks(objective.model):
            fully_shard(blk, mesh=dmesh, mp_policy=mp)
        fully_shard(objective, mesh=dmesh, mp_policy=mp)
        super().__init__(objective, objective.model, mesh, groups, betas, eps, device)

    @contextlib.contextmanager
    def no_sync(self):
        self.objective.set_requires_gradient_sync(False)
        try:
            yield
        finally:
            self.objective.set_requires_gradient_sync(True)

    def _range(self, p, for_load):
        w = self.mesh.dims.dp
        if w == 1:
            return 0, p.numel()
        # fully_shard cuts dim 0 into ceil(rows / w) rows per rank; this rank holds its local rows
        rows = p.shape[0] if p.ndim else 1
        per_row = p.numel() // max(rows, 1)
        s = min(rows, self.mesh.dp_rank * -(-rows // w)) * per_row
        return s, s + _local(p).numel()

    def _held(self, t, s, e):
        return _local(t).reshape(-1)


def build_engine(objective: nn.Module, mesh: Mesh, layout: ParallelLayout, optimizer: AdamWSpec,
                 device: torch.device | str = "cpu", kernel_backend: str | None = None) -> Engine:
    """The data-parallel engine of ``layout`` over ``objective``: the last step of
    :func:`maws_fast.train.parallelize.parallelize`, which applies TP, activation checkpointing and
    compile to the network first.

    Args:
        objective: module with ``forward(imgs, targets, step, micro, accum) -> loss`` and the network as
            ``.model``, holding the same weights on every rank (TP-split already where ``tp > 1``).
        mesh: from :func:`~maws_fast.parallel.mesh.init_distributed`.
        layout: the validated engine, ZeRO stage, weight dtype and buckets on ``mesh``'s degrees.
        optimizer: the AdamW the engine owns (groups by name, betas, eps).
        device: training device (where the engines' buffers live).
        kernel_backend: maws_kernels backend of ours' fused AdamW (None = best).
    """
    device = torch.device(device)
    if layout.dims != mesh.dims:
        raise ValueError(f"the layout's degrees {layout.dims} are not the mesh's {mesh.dims}: build the layout "
                         "from the mesh (ParallelLayout.of(parallel, mesh.dims))")
    if mesh.dims.tp > 1 and not tp_layout(objective.model):
        raise ValueError(f"tp={mesh.dims.tp} but objective.model has no tensor-parallel layer: apply "
                         "maws_fast.parallel.tensor.apply_tensor_parallel first (train.parallelize.parallelize does)")
    groups, betas, eps = optimizer.groups, optimizer.betas, optimizer.eps
    if layout.engine == "ours":
        return ZeroEngine(objective, mesh, layout, groups, betas, eps, device, kernel_backend)
    if layout.engine == "ddp":
        return DDPEngine(objective, mesh, layout, groups, betas, eps, device)
    return FSDP2Engine(objective, mesh, layout, groups, betas, eps, device)


@torch.no_grad()
def consolidated_state_dict(engine: Engine, mesh: Mesh) -> dict[str, torch.Tensor]:
    """The full trainable parameters with timm keys (DP- and TP-gathered), fp32, on every rank. Collective.

    Frozen tensors (the sin-cos pos-embeds) are not included: every rank has them whole.
    """
    from maws_fast.parallel.tensor import tp_full

    local = engine.full_state_dict()
    if mesh.dims.tp == 1:
        return local
    splits = tp_layout(engine.model)
    out = {}
    for name, t in local.items():
        split = splits.get(name)
        if split is None:
            out[name] = t
            continue
        parts = [torch.empty_like(t) for _ in range(mesh.dims.tp)]
        dist.all_gather(parts, t.contiguous(), group=mesh.tp_group)
        out[name] = tp_full(parts, split)
    return out
