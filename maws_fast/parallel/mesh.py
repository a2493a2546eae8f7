"""The process mesh: data parallel x tensor parallel over torch.distributed.

torchrun starts one process per device and sets RANK / WORLD_SIZE / LOCAL_RANK / MASTER_ADDR /
MASTER_PORT; :func:`init_distributed` reads them, so one command covers one process on a CPU,
several GPUs on a node and several nodes (torchrun's rendezvous). Without torchrun's variables the
run is one process and no process group is created.

Rank layout: ``rank = dp_rank * tp + tp_rank``. TP ranks are adjacent, so a TP group stays inside
a node (its all-reduces run on NVLink) while DP groups span nodes.

What runs on the mesh is a :class:`ParallelLayout`: the degrees (:class:`ParallelDims`) and the
engine, ZeRO stage and weight dtype over them. It is the one place a parallel layout is checked
at run time; every check names the setting and the fix.
"""
from __future__ import annotations

import datetime
import gc
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

from maws_fast.config import ParallelConfig
from maws_fast.config.schema import check_layout
from maws_fast.errors import ConfigError


@dataclass(frozen=True)
class ParallelDims:
    """Data-parallel x tensor-parallel degrees of a world, validated.

    Args:
        world: number of processes.
        tp: tensor-parallel degree (ranks that split each layer and see the same batch).
    """

    world: int
    tp: int = 1

    def __post_init__(self):
        if self.world < 1 or self.tp < 1:
            raise ConfigError(f"config: parallel.tp: world size {self.world} and tp {self.tp} must be >= 1")
        if self.world % self.tp:
            raise ConfigError(
                f"config: parallel.tp={self.tp} does not divide the world size {self.world}; launch a multiple of "
                f"{self.tp} processes (torchrun --nproc_per_node) or set --parallel.tp to a divisor of {self.world}")

    @property
    def dp(self) -> int:
        return self.world // self.tp


@dataclass(frozen=True)
class ParallelLayout:
    """What runs on a mesh of ``dims``: the engine, its ZeRO stage, weight dtype and buckets, validated.

    The one place a parallel layout is checked when a stage is parallelized: the degrees (by
    :class:`ParallelDims`), the engine's name, the ZeRO stage, tp > 1 only with our engine, DDP only
    with fp32 weights, FSDP2 only with a process group. The config checks the same settings as it
    reads them, with the same words, so that a bad file fails before any process starts; this
    checks the resolved values against the world the run has (and the callers that build no
    config file: benchmarks, tests).

    Args:
        dims: the data-parallel x tensor-parallel degrees.
        engine: ``ours`` | ``fsdp2`` | ``ddp``.
        zero_stage: 0-3 (engine=ours; the others ignore it).
        param_dtype: ``fp32`` | ``bf16`` (bf16 model weights, fp32 master and AdamW state).
        bucket_mb: gradient bucket size in MiB (ours stages 0-2, DDP).
        prefetch: ours stage 3: all-gather the next block while the current one runs.
    """

    dims: ParallelDims
    engine: str = "ours"
    zero_stage: int = 0
    param_dtype: str = "fp32"
    bucket_mb: float = 25.0
    prefetch: bool = True

    def __post_init__(self):
        if self.zero_stage is None or self.param_dtype == "auto":
            raise ValueError("a ParallelLayout holds resolved settings: make parallel.zero_stage and "
                             "parallel.param_dtype concrete first (maws_fast.config.resolve_parallel)")
        check_layout(self.engine, self.zero_stage, self.dims.tp, self.param_dtype, self.bucket_mb)  # the config's rules
        # FSDP2 shards over a torch DeviceMesh, which needs a process group even for one rank
        if self.engine == "fsdp2" and not dist.is_initialized():
            raise ConfigError("config: parallel.engine=fsdp2 needs torch.distributed: launch with torchrun "
                              "(one process: --nproc_per_node=1)")

    @classmethod
    def of(cls, parallel: ParallelConfig, dims: ParallelDims) -> ParallelLayout:
        """The layout of a resolved ``parallel`` config on a mesh of ``dims`` (whose tp it must have)."""
        if parallel.tp != dims.tp:
            raise ConfigError(f"config: parallel.tp={parallel.tp} but the process mesh was built with tp={dims.tp}; "
                              "build the mesh from the same config (init_distributed(tp=parallel.tp))")
        return cls(dims, parallel.engine, parallel.zero_stage, parallel.param_dtype, parallel.bucket_mb,
                   parallel.prefetch)


@dataclass
class Mesh:
    """This process's place in the mesh and the groups it talks over (None where a degree is 1)."""

    dims: ParallelDims
    rank: int = 0
    dp_group: object = None
    tp_group: object = None
    backend: str | None = None  # "gloo" | "nccl" | None (one process)
    device_mesh: object = None  # torch DeviceMesh ("dp", "tp"), for FSDP2; None in one process

    @property
    def tp_rank(self) -> int:
        return self.rank % self.dims.tp

    @property
    def dp_rank(self) -> int:
        return self.rank // self.dims.tp

    @property
    def distributed(self) -> bool:
        return self.backend is not None

    def barrier(self) -> None:
        """All ranks meet (no-op in one process)."""
        if self.distributed:
            dist.barrier()


def single_process() -> Mesh:
    """The mesh of a run without torch.distributed."""
    return Mesh(ParallelDims(1, 1))


def _env_int(name: str) -> int | None:
    v = os.environ.get(name)
    if v is None:
        return None
    try:
        return int(v)
    except ValueError:
        raise ConfigError(f"environment variable {name}={v!r} is not an integer; launch with torchrun") from None


def attempt_store(timeout_s: float, client_only: bool = False):
    """The rendezvous store torchrun set up (MASTER_ADDR / MASTER_PORT), its keys prefixed by this
    attempt's restart count. Under an elastic restart torchrun's agent keeps one store for every
    attempt, so without the prefix a restarted rank can read the address a dead rank of the previous
    attempt published and fail to connect. Without torchrun's agent store rank 0 hosts it, unless
    ``client_only`` (a second connection, e.g. the watchdog's)."""
    import os

    agent = os.environ.get("TORCHELASTIC_USE_AGENT_STORE", "").lower() == "true"
    rank, world = _env_int("RANK") or 0, _env_int("WORLD_SIZE") or 1
    host = not (agent or client_only) and rank == 0
    store = dist.TCPStore(os.environ.get("MASTER_ADDR", "127.0.0.1"), int(os.environ.get("MASTER_PORT", "29500")),
                          world, is_master=host, timeout=datetime.timedelta(seconds=timeout_s),
                          **({"multi_tenant": True} if host else {}))
    return dist.PrefixStore(f"maws/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)


def init_distributed(tp: int = 1, device: torch.device | str = "cpu", backend: str = "auto",
                     timeout_s: float = 1800.0) -> Mesh:
    """Join the process group torchrun set up (if any) and build the dp x tp groups.

    Args:
        tp: tensor-parallel degree; must divide the world size.
        device: the training device; ``cuda`` selects NCCL and this rank's GPU (LOCAL_RANK).
        backend: ``auto`` (NCCL for CUDA, else gloo), ``gloo`` or ``nccl``.
        timeout_s: how long a collective may wait for a missing rank before the job fails.

    Returns:
        The :class:`Mesh` of this process (world 1 when not launched by torchrun).
    """
    world = _env_int("WORLD_SIZE") or 1
    if world == 1 and not dist.is_initialized():
        ParallelDims(1, tp)  # tp > 1 in one process: the same clear error
        return single_process()
    device = torch.device(device)
    if backend == "auto":
        backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl" and device.type != "cuda":
        raise ConfigError("config: parallel.backend: nccl needs --run.device=cuda; use gloo for CPU training")
    dims = ParallelDims(world, tp)  # validate before any process blocks in a rendezvous
    if device.type == "cuda":
        local = _env_int("LOCAL_RANK") or 0
        if local >= torch.cuda.device_count():
            raise ConfigError(f"LOCAL_RANK {local} but this node has {torch.cuda.device_count()} GPUs; "
                              "launch at most one process per GPU (torchrun --nproc_per_node)")
        torch.cuda.set_device(local)
    if not dist.is_initialized():
        dist.init_process_group(backend, timeout=datetime.timedelta(seconds=timeout_s), store=attempt_store(timeout_s),
                                rank=_env_int("RANK") or 0, world_size=world)
    if dist.get_world_size() != world:
        raise ConfigError(f"WORLD_SIZE={world} but the process group has {dist.get_world_size()} ranks")
    from torch.distributed.device_mesh import init_device_mesh

    # The device mesh is (dp, tp) over arange(world): the same rank layout as Mesh.dp_rank / tp_rank.
    device_mesh = init_device_mesh(device.type, (dims.dp, dims.tp), mesh_dim_names=("dp", "tp"))
    dp_group = device_mesh.get_group("dp") if dims.dp > 1 else None
    tp_group = device_mesh.get_group("tp") if dims.tp > 1 else None
    return Mesh(dims, dist.get_rank(), dp_group, tp_group, backend, device_mesh)


def destroy() -> None:
    """Leave the process group (end of a run).

    Engines still waiting for the garbage collector (DDP's reducer and FSDP2's state sit in
    reference cycles) are collected first: destroyed after the group, they would touch a dead
    process group from a random later point, which gloo answers with std::terminate.
    """
    if dist.is_available() and dist.is_initialized():
        gc.collect()
        dist.destroy_process_group()


def all_reduce_mean(t: torch.Tensor, mesh: Mesh) -> torch.Tensor:
    """In place: the mean of ``t`` over the data-parallel ranks (TP ranks hold equal values)."""
    if mesh.dims.dp > 1:
        dist.all_reduce(t, group=mesh.dp_group)
        t.div_(mesh.dims.dp)
    return t


def all_gather_objects(obj, mesh: Mesh) -> list:
    """Every rank's ``obj`` (picklable), in rank order, on every rank; ``[obj]`` in one process."""
    if not mesh.distributed:
        return [obj]
    out = [None] * mesh.dims.world
    dist.all_gather_object(out, obj)
    return out


class _GatherWithGrad(torch.autograd.Function):
    """All-gather over the data-parallel group in forward; in backward each rank gets the sum, over
    ranks, of the gradients of its own slice (an all-reduce then a slice: gloo has no reduce-scatter)."""

    @staticmethod
    def forward(ctx, x, group, world, rank):
        ctx.group, ctx.rank, ctx.rows = group, rank, x.shape[0]
        parts = [torch.empty_like(x) for _ in range(world)]
        dist.all_gather(parts, x.contiguous(), group=group)
        return torch.cat(parts)

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad[ctx.rank * ctx.rows:(ctx.rank + 1) * ctx.rows], None, None, None


def gather_with_grad(t: torch.Tensor, mesh: Mesh) -> tuple[torch.Tensor, int]:
    """(every data-parallel rank's ``t`` concatenated in rank order, this rank's row offset in it),
    differentiable: the gradient of the gathered tensor flows back to every rank's own rows, summed
    over the ranks whose losses used them (open_clip's ``gather_features(gather_with_grad=True)``).
    Every rank must pass the same number of rows. In one process: ``(t, 0)``."""
    if mesh.dims.dp == 1:
        return t, 0
    return _GatherWithGrad.apply(t, mesh.dp_group, mesh.dims.dp, mesh.dp_rank), mesh.dp_rank * t.shape[0]

