"""Engines and the one ``parallelize()`` that applies them, in a fixed order.

``parallelize(objective, ...)``: tensor parallel first (the model's blocks are split in place),
then the data-parallel engine wraps the result. Three engines share one interface (used by the
training loop and the benchmark):

* ``ours``  -- :class:`~maws_fast.parallel.zero.ZeroEngine`, ZeRO stage 0-3 on flat buckets;
* ``fsdp2`` -- PyTorch's ``fully_shard`` per block + root (our baseline);
* ``ddp``   -- PyTorch's DistributedDataParallel.

Interface: ``model`` (call it), ``zero_grad()``, ``backward(loss)``, ``no_sync()``,
``step(lr, clip_grad)``, ``memory_report()``, ``pieces()`` / ``load_pieces()`` /
``shard_tensors()`` / ``load_shard_tensors()`` (sharded checkpoints), ``full_state_dict()``,
``step_count``.

An objective is a module whose ``forward(imgs, targets, step)`` returns the loss and whose
``model`` attribute is the network; every engine names parameters relative to ``model`` (timm
keys), so checkpoints look the same whichever engine wrote them.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

from maws_fast.errors import ConfigError
from maws_fast.parallel.mesh import Mesh
from maws_fast.parallel.tensor import Piece, apply_tensor_parallel
from maws_fast.parallel.zero import ZeroEngine

ENGINES = ("ours", "fsdp2", "ddp")


def _even_range(n: int, rank: int, world: int) -> tuple[int, int]:
    c = -(-n // world)
    return min(n, rank * c), min(n, (rank + 1) * c)


class TorchEngine:
    """DDP or FSDP2 with ``torch.optim.AdamW`` (foreach; fused on CUDA) and torch's clip_grad_norm_."""

    def __init__(self, name: str, objective: nn.Module, mesh: Mesh, weight_decay: float, betas, eps: float,
                 device: torch.device, bucket_mb: float, param_dtype: str):
        from maws_fast.train.optim import param_groups

        self.name, self.objective, self.mesh, self.device = name, objective, mesh, device
        self.inner = objective.model
        dp = mesh.dims.dp
        if name == "ddp":
            from torch.nn.parallel import DistributedDataParallel as DDP

            if param_dtype != "fp32":
                raise ConfigError("config: parallel.param_dtype=bf16 is an engine=ours / fsdp2 setting; DDP keeps fp32 "
                                  "weights (use --run.precision=bf16 for bf16 compute)")
            self.model = DDP(objective, process_group=mesh.dp_group, bucket_cap_mb=bucket_mb,
                             device_ids=[device.index] if device.type == "cuda" else None) if dp > 1 else objective
        else:
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            dmesh = mesh.device_mesh["dp"] if mesh.device_mesh is not None else None
            if dmesh is None:
                from torch.distributed.device_mesh import init_device_mesh

                if not dist.is_initialized():
                    raise ConfigError("config: parallel.engine=fsdp2 needs torch.distributed: launch with torchrun "
                                      "(one process: --nproc_per_node=1)")
                dmesh = init_device_mesh(device.type, (1,))
            mp = MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.bfloat16) \
                if param_dtype == "bf16" else MixedPrecisionPolicy()
            from maws_fast.parallel.tensor import _blocks

            for _, blk in _blocks(self.inner):
                fully_shard(blk, mesh=dmesh, mp_policy=mp)
            fully_shard(objective, mesh=dmesh, mp_policy=mp)
            self.model = objective
        kwargs = {"fused": True} if device.type == "cuda" else {"foreach": True}
        self.optimizer = torch.optim.AdamW(param_groups(self.inner, weight_decay), lr=0.0, betas=tuple(betas),
                                           eps=eps, **kwargs)
        self.params = [p for p in self.inner.parameters() if p.requires_grad]

    @property
    def step_count(self) -> int:
        for st in self.optimizer.state.values():
            return int(st["step"])
        return 0

    def zero_grad(self) -> None:
        self.optimizer.zero_grad(set_to_none=True)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()

    @contextlib.contextmanager
    def no_sync(self):
        if self.name == "ddp" and hasattr(self.model, "no_sync"):
            with self.model.no_sync():
                yield
        elif self.name == "fsdp2":
            self.model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                self.model.set_requires_gradient_sync(True)
        else:
            yield

    def step(self, lr: float, clip_grad: float | None = None):
        for g in self.optimizer.param_groups:
            g["lr"] = lr
        norm = torch.nn.utils.clip_grad_norm_(self.params, clip_grad) if clip_grad is not None else None
        self.optimizer.step()
        return norm

    @staticmethod
    def _local(t: torch.Tensor) -> torch.Tensor:
        return t.to_local() if hasattr(t, "to_local") else t

    def memory_report(self) -> dict[str, int]:
        nb = lambda t: 0 if t is None else self._local(t).numel() * self._local(t).element_size()  # noqa: E731
        return {"params": sum(nb(p) for p in self.params), "grads": sum(nb(p.grad) for p in self.params),
                "optim": sum(nb(v) for st in self.optimizer.state.values() for k, v in st.items() if k != "step")}

    def _ranges(self, for_load: bool):
        r, w = self.mesh.dp_rank, self.mesh.dims.dp
        for name, p in self.inner.named_parameters():
            if not p.requires_grad:
                continue
            n = p.numel()
            if self.name == "fsdp2" and w > 1:
                rows = p.shape[0] if p.ndim else 1
                c = -(-rows // w)
                per_row = n // max(rows, 1)
                s = min(rows, r * c) * per_row
                e = s + self._local(p).numel()
            elif for_load:
                s, e = 0, n  # DDP: every rank needs every param
            else:
                s, e = _even_range(n, r, w)  # DDP: each rank writes 1/N of every param
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
            sl = slice(pc.start, pc.end) if self.name == "ddp" else slice(None)
            out[name] = {"param": self._local(p.detach()).reshape(-1)[sl],
                         "exp_avg": self._local(st["exp_avg"]).reshape(-1)[sl],
                         "exp_avg_sq": self._local(st["exp_avg_sq"]).reshape(-1)[sl]}
        return out

    @torch.no_grad()
    def load_shard_tensors(self, tensors, step_count: int | None) -> None:
        for name, p, _ in self._ranges(True):
            t = tensors[name]
            self._local(p.detach()).reshape(-1).copy_(t["param"])
            if step_count is not None:
                st = self._state(p)
                self._local(st["exp_avg"]).reshape(-1).copy_(t["exp_avg"])
                self._local(st["exp_avg_sq"]).reshape(-1).copy_(t["exp_avg_sq"])
                st["step"] = torch.tensor(float(step_count))

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        out = {}
        for name, p in self.inner.named_parameters():
            if p.requires_grad:
                out[name] = (p.full_tensor() if hasattr(p, "full_tensor") else p.detach()).float().clone()
        return out

    def close(self) -> None:
        pass


def parallelize(objective: nn.Module, mesh: Mesh, *, engine: str = "ours", zero_stage: int = 2,
                weight_decay: float = 0.0, betas=(0.9, 0.999), eps: float = 1e-8, bucket_mb: float = 25.0,
                prefetch: bool = True, param_dtype: str = "fp32", device: torch.device | str = "cpu",
                kernel_backend: str | None = None):
    """Apply parallelism to ``objective`` in the fixed order TP -> data-parallel engine; return the engine.

    Args:
        objective: module with ``forward(imgs, targets, step) -> loss`` and the network as ``.model``,
            holding the same full weights on every rank.
        mesh: from :func:`~maws_fast.parallel.mesh.init_distributed`.
        engine: ``ours`` | ``fsdp2`` | ``ddp``.
        zero_stage: 0-3 (``ours`` only).
        weight_decay, betas, eps: AdamW (no decay on 1-D params and biases).
        bucket_mb: gradient bucket size (ours stages 0-2, DDP).
        prefetch: ours stage 3: all-gather the next block during the current one.
        param_dtype: ``fp32`` | ``bf16`` (bf16 model weights, fp32 master / optimizer state).
        device: training device.
        kernel_backend: maws_kernels backend of the fused AdamW.
    """
    if engine not in ENGINES:
        raise ConfigError(f"config: parallel.engine: {engine!r} is not one of {ENGINES}")
    device = torch.device(device)
    tp = mesh.dims.tp
    if tp > 1 and engine != "ours":
        raise ConfigError(f"config: parallel.tp={tp} needs parallel.engine=ours (our column/row-parallel layers compose "
                          f"with our ZeRO); engine={engine} runs data parallel only: set --parallel.tp=1")
    apply_tensor_parallel(objective.model, mesh.tp_rank, tp, mesh.tp_group)
    if engine == "ours":
        return ZeroEngine(objective, mesh, zero_stage, weight_decay, betas, eps, bucket_mb, prefetch, param_dtype,
                          device, kernel_backend)
    return TorchEngine(engine, objective, mesh, weight_decay, betas, eps, device, bucket_mb, param_dtype)


@torch.no_grad()
def consolidated_state_dict(engine, mesh: Mesh) -> dict[str, torch.Tensor]:
    """The full trainable parameters with timm keys (DP- and TP-gathered), fp32, on every rank. Collective.

    Frozen tensors (the sin-cos pos-embeds) are not included: every rank has them whole.
    """
    from maws_fast.parallel.tensor import tp_full, tp_layout

    local = engine.full_state_dict()
    if mesh.dims.tp == 1:
        return local
    splits = tp_layout(engine.objective.model)
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
