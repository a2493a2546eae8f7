"""Data-parallel engines compared in one run: ours (ZeRO 1/2/3) against FSDP2 and DDP.

``maws-bench dist`` (``benchmarks/bench_dist.py``) starts ``--world`` processes (gloo on CPU,
NCCL on GPUs) and trains the same model on the same global batch with each engine in turn,
reporting per engine:

* the median step time (zero_grad, forward, backward, step; host wall clock, CUDA synchronised),
  the slowest rank's;
* the elements and bytes communicated per step, counted from the collectives themselves (see
  :class:`CommCounter`), next to Ψ (the trainable parameters of one TP rank's model) and to the
  engine's exact theory (2Ψ for DDP and ZeRO-1/2, 3Ψ for what ZeRO-3 / FSDP2 reshard, plus the
  padding each engine adds to make shards even);
* the peak memory per rank: ``torch.cuda.max_memory_allocated`` on a GPU, on CPU the peak RSS
  growth (Linux ``VmHWM`` after resetting it through ``/proc/self/clear_refs``), and the engine's
  persistent model-state bytes (``memory_report()``) on both.

Rows go to ``benchmarks/results/dist.json`` with the speed and memory ratios against FSDP2 and DDP,
each as soon as every rank has measured its engine; an engine that raises on every rank leaves a
failed row and the next one runs. The peak-memory window opens after the warm-up steps.

How communication is counted. Every torch.distributed collective, whether called from Python
(ours, FSDP2) or from C++ (DDP's Reducer), enters the dispatcher as a ``c10d::`` op
(``allreduce_``, ``_reduce_scatter_base_``, ``_allgather_base_``, ...). A TorchDispatchMode sees
those calls with their real tensors, on gloo and NCCL alike, without patching anything. The
profiler (``record_shapes=True``) sees the same ops but cannot count them: its events record a
tensor-list argument as ``[]`` of type ``TensorList`` (DDP's bucket all-reduce, every broadcast; the
exported Chrome trace has the nested sizes but still no dtype), and the backend events
(``gloo:all_reduce [[n]]``) lose the collective's kind (gloo runs a reduce-scatter as an
all-reduce of the full input). Volume per op, in
elements (x element size = bytes): all-reduce of n -> 2n, reduce-scatter of input n -> n,
all-gather of output n -> n, broadcast / reduce / send / recv of n -> n. The counter slows every op
down, so it runs during one extra untimed step, never during the timed ones.
"""
from __future__ import annotations

import argparse
import ctypes
import datetime
import gc
import json
import math
import os
import socket
import tempfile
from collections import defaultdict
from dataclasses import dataclass
from pathlib import Path

import torch
import torch.distributed as dist
import torch.nn as nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves

from maws_fast.bench.common import OUT_HELP, default_out, env_info, sync, time_steps
from maws_fast.bench.results import FAILED, ResultsFile, error_summary, is_measured
from maws_fast.config import PRESETS, OptimConfig, ParallelConfig, RunConfig, model_preset
from maws_fast.errors import ConfigError, UserError

ENGINES = ("ours:1", "ours:2", "ours:3", "fsdp2", "ddp")

# c10d op -> (volume factor, which tensors count): "in" = the op's input tensors, "out" = its
# output tensors (an all-gather moves its gathered output, a reduce-scatter its unscattered input).
_C10D_VOLUME = {
    "allreduce_": (2, "tensors"), "allreduce_coalesced_": (2, "tensors"),
    "_reduce_scatter_base_": (1, "input_tensor"), "reduce_scatter_": (1, "input_tensors"),
    "reduce_scatter_tensor_coalesced_": (1, "inputs"),
    "_allgather_base_": (1, "output_tensor"), "allgather_": (1, "output_tensors"),
    "allgather_into_tensor_coalesced_": (1, "outputs"), "allgather_coalesced_": (1, "output_lists"),
    "broadcast_": (1, "tensors"), "reduce_": (1, "tensors"), "alltoall_base_": (1, "input"),
    "alltoall_": (1, "input_tensors"), "gather_": (1, "input_tensors"), "scatter_": (1, "output_tensors"),
    "send": (1, "tensors"), "recv_": (1, "tensors"),
}
_KIND = {"allreduce": "all_reduce", "reduce_scatter": "reduce_scatter", "allgather": "all_gather"}


@dataclass
class CommRecord:
    """One collective: its c10d op, the group it ran on, and the elements / bytes it moved."""

    op: str
    group: str  # the ProcessGroup's group_name
    group_size: int
    elems: int
    nbytes: int


class CommCounter(TorchDispatchMode):
    """Records every torch.distributed collective issued while active (see the module docstring).

    Use as a context manager around exactly the work to count::

        with CommCounter() as c:
            train_step()
        c.total(group=dp_group_name)  # -> (elements, bytes)
    """

    def __init__(self):
        super().__init__()
        self.records: list[CommRecord] = []
        self.uncounted: list[str] = []  # collectives without a volume rule (none in our engines)

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        if func.namespace in ("c10d", "_c10d_functional"):
            name = func._schema.name.split("::", 1)[1]
            rule = _C10D_VOLUME.get(name) if func.namespace == "c10d" else None
            if rule is None and name not in ("barrier", "monitored_barrier", "wait_tensor"):
                self.uncounted.append(f"{func.namespace}::{name}")  # reported, so a miss cannot hide
            elif rule is not None:
                factor, arg = rule
                bound = dict(zip((a.name for a in func._schema.arguments), args)) | kwargs
                ts = [t for t in tree_leaves(bound[arg]) if isinstance(t, torch.Tensor)]
                pg = dist.ProcessGroup.unbox(bound["process_group"])
                self.records.append(CommRecord(name, pg.group_name, pg.size(), factor * sum(t.numel() for t in ts),
                                               factor * sum(t.numel() * t.element_size() for t in ts)))
        return out

    def total(self, group: str | None = None, exclude: str | None = None) -> tuple[int, int]:
        """(elements, bytes) over the records of ``group`` (all groups but ``exclude`` when None)."""
        rs = [r for r in self.records if (r.group == group if group is not None else r.group != exclude)]
        return sum(r.elems for r in rs), sum(r.nbytes for r in rs)

    def by_op(self) -> dict[str, list[int]]:
        """{collective kind: [calls, elements]} (all_reduce counts 2n, as in the totals)."""
        out: dict[str, list[int]] = defaultdict(lambda: [0, 0])
        for r in self.records:
            kind = next((v for k, v in _KIND.items() if k in r.op), r.op.strip("_"))
            out[kind][0] += 1
            out[kind][1] += r.elems
        return dict(out)


# --- arguments -------------------------------------------------------------------------------
def add_dist_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--world", type=int, default=2, help="processes to start (ignored under torchrun)")
    p.add_argument("--engines", default=",".join(ENGINES), help="ours:<zero stage 0-3>, fsdp2, ddp; comma-separated")
    p.add_argument("--tp", type=int, default=1, help="tensor-parallel degree (divides --world)")
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--task", default="mae", choices=["mae", "wsp"])
    p.add_argument("--num-classes", type=int, default=14, help="WSP head size")
    p.add_argument("--batch-size", type=int, default=64, help="global batch (split over the data-parallel ranks)")
    p.add_argument("--steps", type=int, default=5, help="timed steps per engine")
    p.add_argument("--warmup", type=int, default=2,
                   help="untimed steps before the counted and the timed ones (at least 2 are run)")
    p.add_argument("--param-dtype", default=None, choices=["fp32", "bf16"], help="default: bf16 on GPU, fp32 on CPU")
    p.add_argument("--bucket-mb", type=float, default=25.0, help="ours' and DDP's bucket size")
    p.add_argument("--device", default="auto", choices=["auto", "cpu", "cuda"],
                   help="auto: NCCL on GPUs when there is one per rank, else gloo on CPU")
    p.add_argument("--timeout", type=float, default=600.0, help="seconds a collective may wait for a rank")
    p.add_argument("--out", default=default_out("dist.json"), help=OUT_HELP)


def parse_engines(spec: str) -> list[tuple[str, int | None]]:
    """``"ours:1,ours:3,fsdp2"`` -> ``[("ours", 1), ("ours", 3), ("fsdp2", None)]``."""
    out = []
    for item in (s.strip() for s in spec.split(",") if s.strip()):
        name, _, stage = item.partition(":")
        if name == "ours" and stage in ("0", "1", "2", "3"):
            out.append(("ours", int(stage)))
        elif name in ("fsdp2", "ddp") and not stage:
            out.append((name, None))
        else:
            raise ConfigError(f"maws-bench dist: unknown engine {item!r}; use ours:0..3, fsdp2 or ddp "
                              f"(e.g. --engines {','.join(ENGINES)})")
    if not out:
        raise ConfigError("maws-bench dist: --engines is empty; name at least one of " + ",".join(ENGINES))
    return out


def _label(engine: str, stage: int | None) -> str:
    return f"ours-z{stage}" if engine == "ours" else engine


# --- the model, its loss and the engine ------------------------------------------------------
def _objective(args, cfg, mesh) -> nn.Module:
    """The training objective of ``--task``: the same initial weights on every rank and for every engine."""
    from maws_fast.models import build_classifier, build_mae
    from maws_fast.train.objectives import MAEObjective, WSPObjective

    torch.manual_seed(0)
    if args.task == "mae":
        return MAEObjective(build_mae(cfg), 0.75, seed=0, data_rank=mesh.dp_rank, data_world=mesh.dims.dp)
    return WSPObjective(build_classifier(cfg, args.num_classes, pos_embed_learnable=True))  # as wsp.pos_embed=learned


def build_bench_engine(engine: str, stage: int | None, objective: nn.Module, mesh, device: torch.device, args):
    """ADAPTER: the engine under test, built exactly as the trainer builds it (maws_fast.train.parallelize;
    no activation checkpointing, no compile).

    DDP keeps fp32 weights (it has no bf16 model copy); with ``--param-dtype bf16`` every engine
    computes under bf16 autocast, so DDP then runs as the trainer's ``run.precision=bf16``.
    """
    from maws_fast.parallel.engine import AdamWSpec
    from maws_fast.train.optim import param_groups
    from maws_fast.train.parallelize import parallelize

    optim = OptimConfig(batch_size=args.batch_size)
    parallel = ParallelConfig(engine=engine, zero_stage=stage if stage is not None else 2, tp=mesh.dims.tp,
                              bucket_mb=args.bucket_mb, param_dtype="fp32" if engine == "ddp" else args.param_dtype)
    adamw = AdamWSpec.of(objective.model, param_groups(objective.model, optim.weight_decay),
                         betas=(optim.beta1, optim.beta2))
    return parallelize(objective, mesh, parallel, RunConfig(), adamw, device)


def psi_of(eng) -> int:
    """Ψ: trainable parameters of this TP rank's model, from the engine's checkpoint pieces."""
    return sum(math.prod(pc.shape) // (pc.tp_size if pc.tp is not None else 1) for pc in eng.pieces())


def theory_elems(eng, engine: str, psi: int, dp: int) -> int:
    """Elements one step must move over DP, the way each engine lays its shards out.

    DDP all-reduces unpadded buckets: 2Ψ. Ours pads each flat bucket to a multiple of the DP size
    (zero.theory_comm_elements). FSDP2 pads every parameter's dim 0 to a multiple of the DP size,
    all-gathers each unit (trainable and frozen parameters) in forward, again in backward for the
    blocks (the root stays unsharded between forward and backward), and reduce-scatters the
    trainable ones.
    """
    if dp == 1:
        return 0
    if engine == "ddp":
        return 2 * psi
    if engine == "ours":
        from maws_fast.parallel.zero import theory_comm_elements

        return theory_comm_elements(eng)
    from torch.distributed.fsdp import FSDPModule

    def padded(p):
        shape = p.shape
        return math.ceil(shape[0] / dp) * dp * math.prod(shape[1:]) if len(shape) else dp

    root, total = eng.objective, 0
    units = [m for m in root.modules() if isinstance(m, FSDPModule)]
    nested = {id(p) for u in units if u is not root for p in u.parameters()}
    for u in units:
        ps = [p for p in u.parameters() if u is not root or id(p) not in nested]
        total += (1 if u is root else 2) * sum(padded(p) for p in ps)
        total += sum(padded(p) for p in ps if p.requires_grad)
    return total


# --- memory ----------------------------------------------------------------------------------
def _proc_status_bytes(key: str) -> int | None:
    try:
        for line in Path("/proc/self/status").read_text().splitlines():
            if line.startswith(key + ":"):
                return int(line.split()[1]) * 1024  # reported in kB
    except OSError:
        pass
    return None


def _reset_memory(device: torch.device) -> int | None:
    """Free what the previous engine left and restart the peak counters; returns the baseline."""
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device)
    try:  # give freed heap pages back to the OS, so the RSS baseline is what is alive
        ctypes.CDLL("libc.so.6").malloc_trim(0)
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
    except OSError:
        return None
    return _proc_status_bytes("VmRSS")


def _open_peak_window(device: torch.device) -> None:
    """Restart the peak counters after warm-up (lazy initialisation, first-call autotuning and
    allocator growth stay out of the peak); the baseline stays what was alive before the engine."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return
    try:
        Path("/proc/self/clear_refs").write_text("5")  # VmHWM := the current RSS
    except OSError:
        pass


def _peak_memory(device: torch.device, base: int | None) -> int | None:
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) - base
    hwm = _proc_status_bytes("VmHWM")
    return None if base is None or hwm is None else hwm - base


# --- one rank --------------------------------------------------------------------------------
def _burn_in(args, cfg, mesh, device: torch.device) -> None:
    """Two plain local training steps, so that one-time costs (thread pools, allocator arenas,
    lazy imports) land before the first engine is measured instead of in its time and memory."""
    import torch.distributed.fsdp  # noqa: F401  (imported here, not inside the first FSDP2 measurement)

    objective = _objective(args, cfg, mesh).to(device)
    opt = torch.optim.AdamW(objective.parameters(), lr=1e-4)
    imgs, targets = _batch(args, cfg, mesh, device)
    for step in range(2):
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.param_dtype == "bf16"):
            loss = objective(imgs, targets, step)
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
    if dist.get_world_size() > 1:  # the backend's first large collectives allocate its transport buffers
        flat = torch.cat([p.detach().reshape(-1) for p in objective.parameters()])
        flat = flat[: flat.numel() // dist.get_world_size() * dist.get_world_size()]
        shard = torch.empty(flat.numel() // dist.get_world_size(), device=device)
        dist.all_reduce(flat)
        (getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor)(shard, flat)
        (getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor)(flat, shard)


def _batch(args, cfg, mesh, device: torch.device):
    """This DP rank's share of a random global batch (TP ranks of one DP rank share it)."""
    g = torch.Generator().manual_seed(1000 + mesh.dp_rank)
    n = args.batch_size // mesh.dims.dp
    imgs = torch.randn(n, cfg.in_chans, cfg.img_size, cfg.img_size, generator=g).to(device)
    targets = torch.softmax(torch.randn(n, args.num_classes, generator=g), -1).to(device) if args.task == "wsp" else None
    return imgs, targets


def _bench_engine(engine: str, stage: int | None, args, cfg, mesh, device: torch.device) -> dict:
    """Build one engine on a fresh model and measure it on this rank."""
    base = _reset_memory(device)
    eng = build_bench_engine(engine, stage, _objective(args, cfg, mesh), mesh, device, args)
    psi = psi_of(eng)
    imgs, targets = _batch(args, cfg, mesh, device)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.param_dtype == "bf16")
    lr = OptimConfig(batch_size=args.batch_size).abs_lr
    steps = iter(range(1 << 30))  # the MAE masks are a function of the step: fresh ones every step

    def step():
        eng.zero_grad()
        with amp:
            loss = eng.objective(imgs, targets, next(steps))
        eng.backward(loss)
        eng.step(lr, None)  # no clipping: its norm all-reduce is not part of the 2Ψ / 3Ψ accounting

    # DDP rebuilds its buckets (and broadcasts their order) in its 2nd step and FSDP2 initialises
    # lazily in its 1st: the counted step must come after both.
    for _ in range(max(args.warmup, 2)):
        step()
    _open_peak_window(device)
    with CommCounter() as counter:  # one untimed step: the counter slows every op down
        step()
    sync(device)
    if mesh.distributed:
        dist.barrier()  # every rank starts the timed steps together
    seconds = time_steps(step, args.steps, 0, device)  # median; each step ends with a CUDA synchronize
    tp_name = mesh.tp_group.group_name if mesh.tp_group is not None else None
    elems, nbytes = counter.total(exclude=tp_name)  # everything but the TP all-reduces is DP traffic
    tp_bytes = counter.total(group=tp_name)[1] if tp_name else 0
    res = {"engine": engine, "zero_stage": stage, "psi": psi, "step_s": seconds,
           "comm_elems": elems, "comm_bytes": nbytes, "tp_comm_bytes": tp_bytes, "comm_ops": counter.by_op(),
           "uncounted_ops": sorted(set(counter.uncounted)),
           "comm_theory_elems": theory_elems(eng, engine, psi, mesh.dims.dp),
           "mem_peak_bytes": _peak_memory(device, base), "state_bytes": sum(eng.memory_report().values())}
    eng.close()
    return res


def _run_rank(args, env: dict) -> list[dict] | None:
    """This process's part of the benchmark. Engine by engine, the ranks exchange their numbers and
    rank 0 writes the engine's row to ``args.out`` at once; rank 0 returns every row.

    An engine that raises on every rank (out of memory, a setting it refuses) becomes a failed row
    and the next engine runs; a rank failing alone leaves the others in a collective, which ends
    the run at ``--timeout`` -- with the rows written so far kept."""
    from maws_fast.parallel.mesh import destroy, init_distributed

    local = int(os.environ.get("LOCAL_RANK", 0))
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", os.environ.get("WORLD_SIZE", 1)))
    device = torch.device("cuda", local) if args.device == "cuda" else torch.device("cpu")
    if device.type == "cuda":
        torch.cuda.set_device(device)
    else:
        torch.set_num_threads(max(1, (os.cpu_count() or 1) // local_world))  # ranks share the cores
    if not dist.is_initialized():  # also at world 1: DDP and FSDP2 need a process group
        dist.init_process_group("nccl" if device.type == "cuda" else "gloo",
                                timeout=datetime.timedelta(seconds=args.timeout))
    try:
        mesh = init_distributed(tp=args.tp, device=device, timeout_s=args.timeout)
        cfg = model_preset(args.preset)
        _burn_in(args, cfg, mesh, device)
        main = dist.get_rank() == 0
        out = ResultsFile(args.out if main else None, "maws-bench dist")
        for engine, stage in parse_engines(args.engines):
            try:
                mine = _bench_engine(engine, stage, args, cfg, mesh, device)
            except Exception as e:  # the engine's row says why; the next engine runs
                mine = {"engine": engine, "zero_stage": stage, "error": error_summary(e)}
                gc.collect()
            everyone = [None] * dist.get_world_size()
            dist.all_gather_object(everyone, mine)
            if main:
                out.add(_row(_merge(everyone, mesh), args, env))
                _ratios(out.rows)
                out.save()
    finally:
        destroy()  # collects the engines first (see maws_fast.parallel.mesh.destroy)
    return out.rows if main else None


def _merge(per_rank: list[dict], mesh) -> dict:
    """One engine's numbers over the ranks: the slowest rank's step and the largest rank's memory;
    the first error when any rank failed."""
    where = {"dp": mesh.dims.dp, "world": mesh.dims.world, "backend": mesh.backend}
    errors = [p for p in per_rank if "error" in p]
    if errors:
        return {**errors[0], **where}
    peaks = [p["mem_peak_bytes"] for p in per_rank]
    return {**per_rank[0], "step_s": max(p["step_s"] for p in per_rank),
            "mem_peak_bytes": None if None in peaks else max(peaks),
            "state_bytes": max(p["state_bytes"] for p in per_rank), **where}


def _worker(rank: int, args, env: dict, world: int, port: int, result_dir: str) -> None:
    """Entry point of a spawned rank (torch.multiprocessing passes ``rank`` first)."""
    os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(world), LOCAL_WORLD_SIZE=str(world),
                      MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    try:
        raw = _run_rank(args, env)
    except UserError as e:  # the parent re-raises it as one line; the other ranks are stopped
        Path(result_dir, f"error{rank}.txt").write_text(str(e))
        raise SystemExit(2) from None
    if raw is not None:
        Path(result_dir, "rank0.json").write_text(json.dumps(raw))
    # The rank's work is done and written, and its process group destroyed. Skip the interpreter's
    # finalisation: gloo's worker threads can still drop tensors there, and a GIL taken during
    # finalisation aborts the process (SIGABRT, "terminate called without an active exception";
    # pytorch/pytorch#179291 describes it), which would fail a finished benchmark.
    os._exit(0)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _spawn(args, env: dict, world: int) -> list[dict]:
    """Start ``world`` ranks on this machine and return rank 0's rows."""
    import torch.multiprocessing as torch_mp

    with tempfile.TemporaryDirectory() as tmp:
        try:
            torch_mp.start_processes(_worker, args=(args, env, world, _free_port(), tmp), nprocs=world, join=True,
                                   start_method="spawn")
        except (torch_mp.ProcessExitedException, torch_mp.ProcessRaisedException):
            errors = sorted(Path(tmp).glob("error*.txt"))
            if errors:
                raise ConfigError(errors[0].read_text()) from None
            raise
        return json.loads(Path(tmp, "rank0.json").read_text())


# --- the benchmark ---------------------------------------------------------------------------
def _resolve(args) -> int:
    """Check the arguments before any process starts; returns the world size."""
    under_torchrun = "RANK" in os.environ and "WORLD_SIZE" in os.environ
    world = int(os.environ["WORLD_SIZE"]) if under_torchrun else args.world
    if world < 1 or args.steps < 1:
        raise ConfigError(f"maws-bench dist: --world ({world}) and --steps ({args.steps}) must be >= 1")
    engines = parse_engines(args.engines)
    if args.tp > 1 and any(e != "ours" for e, _ in engines):
        # Our column/row-parallel layers compose with our ZeRO only; FSDP2 and DDP run data parallel.
        print(f"maws-bench dist: --tp {args.tp}: fsdp2 and ddp skipped (tensor parallel runs with engine=ours)")
        args.engines = ",".join(f"ours:{s}" for e, s in engines if e == "ours")
        if not args.engines:
            raise ConfigError(f"maws-bench dist: --tp {args.tp} needs an ours:<stage> engine in --engines")
    from maws_fast.parallel.mesh import ParallelDims

    dp = ParallelDims(world, args.tp).dp
    if args.batch_size % dp:
        raise ConfigError(f"maws-bench dist: --batch-size {args.batch_size} is not divisible by the {dp} "
                          f"data-parallel ranks; use a multiple of {dp}")
    cuda_ok = torch.cuda.is_available() and (under_torchrun or world <= torch.cuda.device_count())
    if args.device == "cuda" and not cuda_ok:
        raise ConfigError(f"maws-bench dist: --device cuda needs one GPU per rank; this machine has "
                          f"{torch.cuda.device_count()} for --world {world}")
    if args.device == "auto":
        args.device = "cuda" if cuda_ok else "cpu"
    if args.param_dtype is None:
        args.param_dtype = "bf16" if args.device == "cuda" else "fp32"
    return world


def _ratio(a, b) -> float | None:
    return round(a / b, 3) if a and b else None


def bench_dist(args: argparse.Namespace) -> list[dict]:
    """Run ``maws-bench dist`` (see the module docstring); returns the rows it appended (rank 0
    appends each engine's row to ``--out`` as soon as every rank has measured it)."""
    world = _resolve(args)
    ResultsFile(args.out, "maws-bench dist")  # an unreadable results file fails here, before any rank starts
    env = env_info()
    if "RANK" in os.environ and "WORLD_SIZE" in os.environ:  # launched by torchrun: we are one rank
        rows = _run_rank(args, env)
        if rows is None:
            return []
    else:
        rows = _spawn(args, env, world)
    _print_table(rows)
    if args.out and rows:
        print(f"appended {len(rows)} rows to {args.out}")
    return rows


def _row(r: dict, args, env: dict) -> dict:
    """The results row of one engine's merged numbers (a failed row when a rank raised)."""
    row = {"bench": "dist", "engine": _label(r["engine"], r["zero_stage"]), "zero_stage": r["zero_stage"],
           "tp": args.tp, "dp": r["dp"], "world": r["world"], "backend": r["backend"],
           "preset": args.preset, "task": args.task, "batch_size": args.batch_size,
           "param_dtype": "fp32" if r["engine"] == "ddp" else args.param_dtype,
           "autocast_bf16": args.param_dtype == "bf16", "steps": args.steps}
    if "error" in r:
        return {**row, "status": FAILED, "error": r["error"], **env}
    psi, theory = r["psi"], r["comm_theory_elems"]
    return {**row, "step_ms": round(r["step_s"] * 1e3, 3),
            "psi": psi, "comm_elems": r["comm_elems"], "comm_bytes": r["comm_bytes"],
            "comm_over_psi": round(r["comm_elems"] / psi, 4) if psi else None,
            "comm_theory_elems": theory, "comm_matches_theory": r["comm_elems"] == theory,
            "comm_ops": r["comm_ops"], "uncounted_ops": r["uncounted_ops"],
            "tp_comm_bytes": r["tp_comm_bytes"],
            "mem_peak_bytes": r["mem_peak_bytes"], "state_bytes": r["state_bytes"],
            "mem_kind": "cuda max_memory_allocated" if args.device == "cuda" else "peak RSS growth (VmHWM)",
            "threads_per_rank": None if args.device == "cuda" else max(1, (os.cpu_count() or 1) // r["world"]),
            **env}


def _ratios(rows: list[dict]) -> None:
    """Speed and memory of every measured row against FSDP2's and DDP's (None until those ran)."""
    rows = [r for r in rows if is_measured(r)]
    for base in ("fsdp2", "ddp"):
        b = next((r for r in rows if r["engine"] == base), None)
        for r in rows:
            r[f"speedup_vs_{base}"] = _ratio(b["step_ms"], r["step_ms"]) if b else None  # > 1: faster
            r[f"mem_vs_{base}"] = _ratio(r["mem_peak_bytes"], b["mem_peak_bytes"]) if b else None  # < 1: less


def _mib(n) -> str:
    return "-" if n is None else f"{n / 2**20:.1f}"


def _x(v) -> str:
    return "-" if v is None else f"x{v:.2f}"


def _print_table(rows: list[dict]) -> None:
    for r in rows:
        if not is_measured(r):
            print(f"{r['engine']}: FAILED, {r['error']}")
    rows = [r for r in rows if is_measured(r)]
    if not rows:
        return
    r0 = rows[0]
    print(f"{r0['preset']} {r0['task']}, global batch {r0['batch_size']}, world {r0['world']} (dp {r0['dp']} x tp "
          f"{r0['tp']}, {r0['backend']}), {r0['param_dtype']}, Ψ = {r0['psi']:,} params; memory: {r0['mem_kind']}")
    print(f"{'engine':<8} {'ms/step':>9} {'comm MiB':>9} {'comm/Ψ':>7} {'=theory':>8} {'peak MiB':>9} "
          f"{'state MiB':>9} {'vs fsdp2 (time, mem)':>21} {'vs ddp (time, mem)':>19}")
    for r in rows:
        print(f"{r['engine']:<8} {r['step_ms']:9.2f} {_mib(r['comm_bytes']):>9} {r['comm_over_psi'] or 0:7.3f} "
              f"{str(r['comm_matches_theory']):>8} {_mib(r['mem_peak_bytes']):>9} {_mib(r['state_bytes']):>9} "
              f"{_x(r['speedup_vs_fsdp2']):>10} {_x(r['mem_vs_fsdp2']):>10} {_x(r['speedup_vs_ddp']):>9} "
              f"{_x(r['mem_vs_ddp']):>9}")
    if r0["tp"] > 1:
        print("TP all-reduces per step (not in comm): " + ", ".join(f"{r['engine']} {_mib(r['tp_comm_bytes'])} MiB"
                                                                 for r in rows))
