"""Run tiny MAE / WSP training under several parallel layouts in gloo process groups on CPU.

The parent test spawns ``world`` processes once; each process runs every requested layout in turn
(engine, ZeRO stage, TP degree, gradient accumulation) on the same global batches, and rank 0
saves what the tests compare: the mean loss of every step, the consolidated final parameters
(timm keys, full shapes) and every rank's memory report. A one-process reference is plain
``torch.optim.AdamW`` + ``clip_grad_norm_`` on the unsharded model, independent of our engines.
"""
from __future__ import annotations

import os
import socket
import traceback
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path

import torch

# lr 1e-5: Adam turns fp32 rounding differences of near-cancelling gradient elements into step
# differences proportional to lr (~1e-7 here, as FSDP2 shows); wd 0.5 makes a decay applied to the
# wrong parameters visible at that tolerance. Grad-norm checks catch scale errors Adam would hide.
BATCH, STEPS, LR, CLIP, WD, BETAS = 8, 3, 1e-5, 1.0, 0.5, (0.9, 0.95)


@dataclass(frozen=True)
class Layout:
    engine: str = "ours"
    stage: int = 2
    tp: int = 1
    accum: int = 1
    param_dtype: str = "fp32"
    bucket_mb: float = 0.05  # tiny buckets: several per model, so bucketing and padding are exercised
    prefetch: bool = True
    kernels: str = "torch"  # the model's kernel backend; "triton" (interpreted) fuses the residual adds into norms
    layer_decay: float | None = None  # the fine-tune's layer-wise lr decay groups instead of MAE's two
    ckpt: str = "none"  # run.activation_checkpoint of every block
    compile: bool = False  # run.compile: each block's body through torch.compile (inductor on CPU)

    @property
    def key(self) -> str:
        key = f"{self.engine}-z{self.stage}-tp{self.tp}-acc{self.accum}-{self.param_dtype}-pf{int(self.prefetch)}"
        if self.kernels != "torch":
            key += f"-{self.kernels}"
        if self.ckpt != "none" or self.compile:
            key += f"-ac_{self.ckpt}" + ("-compiled" if self.compile else "")
        return key if self.layer_decay is None else f"{key}-lrd{self.layer_decay}"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _skip_block(model, index: int) -> None:
    """Make the classifier's forward skip ``blocks[index]`` (a registered block that never runs)."""
    import types

    def forward_features(self, x):
        x = self.patch_embed(x) + self.pos_embed[:, 1:, :]
        cls = (self.cls_token + self.pos_embed[:, :1, :]).expand(x.shape[0], -1, -1)
        x = torch.cat([cls, x], dim=1)
        for i, blk in enumerate(self.blocks):
            if i != index:
                x = blk(x)
        return self.norm(x)

    model.forward_features = types.MethodType(forward_features, model)


def build(task: str, kernels: str = "torch"):
    """The tiny model of ``task``, its objective factory and its batches (the same on every rank).

    ``wsp_skip``: the WSP model with a block that never runs (its params get no gradient).
    ``kernels``: the model's kernel backend.
    """
    from maws_fast.config import model_preset
    from maws_fast.models import build_classifier, build_mae
    from maws_fast.train.objectives import MAEObjective, WSPObjective

    cfg = model_preset("tiny", attn_backend="manual", kernel_backend=kernels)
    torch.manual_seed(0)
    g = torch.Generator().manual_seed(1)
    n = STEPS + 1  # one more batch: the step after a checkpoint is loaded
    imgs = [torch.randn(BATCH, 1, 28, 28, generator=g) for _ in range(n)]
    if task == "mae":
        model = build_mae(cfg, norm_pix_loss=True)
        targets = [None] * n
        make = lambda m, r, w: MAEObjective(m, 0.75, 0, r, w)  # noqa: E731
    else:
        model = build_classifier(cfg, num_classes=10)
        if task == "wsp_skip":
            _skip_block(model, 2)
        targets = []
        for _ in range(n):
            t = (torch.rand(BATCH, 10, generator=g) < 0.3).float()
            t[:, 0] = 1.0
            targets.append(t / t.sum(1, keepdim=True))  # multi-hot / number of tags
        make = lambda m, r, w: WSPObjective(m)  # noqa: E731
    return model, make, imgs, targets


def groups_for(model, layer_decay: float | None) -> list[dict]:
    """MAE's decay / no-decay groups, or the fine-tune's layer-wise decay ones."""
    from maws_fast.train.optim import layer_decay_groups, param_groups

    return param_groups(model, WD) if layer_decay is None else layer_decay_groups(model, WD, layer_decay)


def reference(task: str, kernels: str = "torch", layer_decay: float | None = None
              ) -> tuple[list[float], list[float], dict[str, torch.Tensor]]:
    """One process, unsharded: torch AdamW (each group at LR * its lr_scale) + clip_grad_norm_ on the global batch."""
    model, make, imgs, targets = build(task, kernels)
    obj = make(model, 0, 1)
    groups = [{**g, "lr": LR * g.get("lr_scale", 1.0)} for g in groups_for(model, layer_decay)]
    opt = torch.optim.AdamW(groups, lr=LR, betas=BETAS, foreach=False)
    losses, norms = [], []
    for s in range(STEPS):
        opt.zero_grad(set_to_none=True)
        loss = obj(imgs[s], targets[s], s)
        loss.backward()
        norms.append(torch.nn.utils.clip_grad_norm_([p for p in model.parameters() if p.requires_grad], CLIP).item())
        opt.step()
        losses.append(loss.item())
    return losses, norms, {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _rows(x, rank: int, world: int, accum: int = 1, micro: int = 0):
    if x is None:
        return None
    b = x.shape[0] // (world * accum)
    first = (rank * accum + micro) * b
    return x[first:first + b]


def _train_steps(engine, mesh, layout: Layout, imgs, targets, steps) -> list[float]:
    from maws_fast.parallel.mesh import all_reduce_mean

    dp, losses, norms = mesh.dims.dp, [], []
    for s in steps:
        engine.zero_grad()
        total = torch.zeros(())
        for m in range(layout.accum):
            x, t = _rows(imgs[s], mesh.dp_rank, dp, layout.accum, m), _rows(targets[s], mesh.dp_rank, dp, layout.accum, m)
            ctx = engine.no_sync() if m < layout.accum - 1 else torch.enable_grad()
            with ctx:
                loss = engine.objective(x, t, s, m, layout.accum)
                engine.backward(loss / layout.accum)
            total += loss.detach() / layout.accum
        norms.append(float(engine.step(LR, CLIP)))  # the global grad norm before clipping
        losses.append(all_reduce_mean(total, mesh).item())
    return losses, norms


@contextmanager
def _engine(task: str, layout: Layout, perturb: bool = False):
    """(mesh, engine, imgs, targets) of ``layout``, parallelized as the training loop does it
    (maws_fast.train.parallelize: TP -> activation checkpointing -> compile -> the engine), inside
    the compile scope the loop opens around parallelize and training."""
    from maws_fast.config import ParallelConfig, RunConfig
    from maws_fast.parallel.engine import AdamWSpec
    from maws_fast.parallel.mesh import init_distributed
    from maws_fast.train.parallelize import parallelize
    from maws_fast.train.regional_compile import compile_scope

    mesh = init_distributed(tp=layout.tp, timeout_s=120)
    model, make, imgs, targets = build(task, layout.kernels)
    if perturb:  # a loaded checkpoint must overwrite every trained tensor
        with torch.no_grad():
            for p in model.parameters():
                if p.requires_grad:
                    p.add_(1.0)
    obj = make(model, mesh.dp_rank, mesh.dims.dp)
    parallel = ParallelConfig(engine=layout.engine, zero_stage=layout.stage, tp=layout.tp, bucket_mb=layout.bucket_mb,
                              prefetch=layout.prefetch, param_dtype=layout.param_dtype)
    run = RunConfig(activation_checkpoint=layout.ckpt, compile=layout.compile)
    adamw = AdamWSpec.of(model, groups_for(model, layout.layer_decay), BETAS)
    with compile_scope(layout.key, model, run.compile) as compiled:
        engine = parallelize(obj, mesh, parallel, run, adamw, "cpu", compiled=compiled)
        yield mesh, engine, imgs, targets


def run_layout(task: str, layout: Layout, kind: str = "train", path: str | None = None) -> dict:
    """One job in this (already joined) process group; returns what rank 0 reports.

    kind "train": STEPS steps. "save": STEPS steps, a sharded checkpoint at ``path``, then one more
    step. "load": a perturbed model loads ``path`` and takes that one more step.
    """
    with _engine(task, layout, perturb=kind == "load") as (mesh, engine, imgs, targets):
        return _run_job(mesh, engine, layout, imgs, targets, kind, path)


def _run_job(mesh, engine, layout: Layout, imgs, targets, kind: str, path: str | None) -> dict:
    import torch.distributed as dist

    from maws_fast.parallel.checkpoint import load_sharded, save_sharded
    from maws_fast.parallel.engine import consolidated_state_dict

    out = {"dp": mesh.dims.dp, "padded": sum(b.padded for b in getattr(engine, "buckets", [])),
           "n_buckets": len(getattr(engine, "buckets", []))}
    if kind == "eval":  # a forward of the bare network right after step(), before the next zero_grad()
        _train_steps(engine, mesh, layout, imgs, targets, range(1))
        with torch.no_grad():
            out["eval"] = engine.model(imgs[0][:2]).clone()
        out["params"] = consolidated_state_dict(engine, mesh)
        engine.close()
        mesh.barrier()
        return out
    if kind == "load":
        tensors, _extra, meta, _ = load_sharded(Path(path) / "step_00000003", engine.load_pieces())
        engine.load_shard_tensors(tensors, meta["optim_steps"])
        out["loaded"] = consolidated_state_dict(engine, mesh)
    else:
        out["losses"], out["norms"] = _train_steps(engine, mesh, layout, imgs, targets, range(STEPS))
        mem = engine.memory_report()
        mems = [None] * dist.get_world_size()
        dist.all_gather_object(mems, mem)
        out["mem"] = mems
        out["params"] = consolidated_state_dict(engine, mesh)
        # stage-3 buckets still holding full params after the step (a block that never ran, ...)
        out["gathered_bytes"] = sum(b.full.untyped_storage().nbytes() for b in getattr(getattr(engine, "gathering", None), "forward_order", []))
    if kind == "save":
        save_sharded(path, "step_00000003", rank=mesh.rank, world=mesh.dims.world, pieces=engine.pieces(),
                     tensors=engine.shard_tensors(), extra={}, meta={"optim_steps": engine.step_count},
                     rank_meta={}, barrier=mesh.barrier)
    if kind in ("save", "load"):
        _train_steps(engine, mesh, layout, imgs, targets, [STEPS])
        out["next"] = consolidated_state_dict(engine, mesh)
    engine.close()
    mesh.barrier()
    return out


def worker(rank: int, world: int, port: int, jobs: list[tuple], out_dir: str) -> None:
    os.environ.update(RANK=str(rank), WORLD_SIZE=str(world), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                      MASTER_PORT=str(port))
    torch.set_num_threads(1)
    results, error = {}, None
    try:
        for job in jobs:
            task, layout, kind, path = (*job, "train", None)[:4] if len(job) == 2 else job
            results[(kind, task, layout.key)] = run_layout(task, layout, kind, path)
    except Exception:  # reported to the parent test, which fails with it
        error = traceback.format_exc()
    if rank == 0 or error:
        torch.save({"results": results, "error": error}, Path(out_dir) / f"rank{rank}.pt")
    from maws_fast.parallel.mesh import destroy

    destroy()
    # Everything is saved: skip interpreter finalisation, where gloo's threads can still drop tensors
    # and abort the process (see maws_fast/bench/dist.py, _worker).
    os._exit(0 if error is None else 1)


def spawn_ranks(target, world: int, args: tuple, timeout: float) -> list:
    """Start ``target(rank, world, port, *args)`` in ``world`` spawned processes on a free port, wait
    for them (killing any still alive after ``timeout`` s) and return the processes (for exit codes)."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    port = free_port()
    procs = [ctx.Process(target=target, args=(r, world, port, *args)) for r in range(world)]
    for p in procs:
        p.start()
    for p in procs:
        p.join(timeout=timeout)
    for p in procs:
        if p.is_alive():
            p.kill()
    return procs


def run_world(world: int, jobs: list[tuple], out_dir: Path) -> dict:
    """Spawn ``world`` gloo ranks that run ``jobs``; returns rank 0's results (raises a rank's error).

    A job is ``(task, layout)`` (train) or ``(task, layout, "save" | "load", checkpoint dir)``;
    results are keyed ``(kind, task, layout.key)``.
    """
    procs = spawn_ranks(worker, world, (jobs, str(out_dir)), timeout=900)
    errors = []
    for r in range(world):
        f = out_dir / f"rank{r}.pt"
        if f.exists():
            d = torch.load(f, weights_only=False)
            if d["error"]:
                errors.append(f"rank {r}:\n{d['error']}")
    if errors:
        raise AssertionError("\n".join(errors))
    if any(p.exitcode != 0 for p in procs):
        raise AssertionError(f"a rank exited with {[p.exitcode for p in procs]}")
    return torch.load(out_dir / "rank0.pt", weights_only=False)["results"]
