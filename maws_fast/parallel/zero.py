"""ZeRO stages 0-3 over flat buckets, built on torch.distributed collectives.

Layout. The trainable parameters of (this TP rank's) model are packed into buckets: flat 1-D
buffers of up to ``bucket_mb`` each, in backward order, every bucket padded to a multiple of the
data-parallel size ``N`` and cut into ``N`` equal chunks; DP rank ``r`` owns chunk ``r`` of every
bucket. Inside a bucket the parameters are sorted by (param group, replicated-over-TP), so a chunk
is at most (groups x 2) runs of one group (one weight decay) and one TP kind: one fused AdamW
launch and one norm term per run.

What each rank keeps (Ψ = parameters, N = DP ranks; + fp32 master and model copy where the
model dtype is bf16):

=======  =============================  ==============================  ======================
stage    parameters                     gradients                       AdamW m, v
=======  =============================  ==============================  ======================
0        full (bucket views)            full, all-reduced in buckets    full
1        full (bucket views)            full, reduce-scattered          chunk (1/N)
2        full (bucket views)            chunk (1/N), reduce-scattered   chunk (1/N)
                                        as backward produces them
3        chunk (1/N); a bucket (= one   chunk (1/N)                     chunk (1/N)
         block) is all-gathered just
         before it runs, freed after
=======  =============================  ==============================  ======================

Communication per step: stages 0-2 move 2Ψ (reduce-scatter + all-gather, or an all-reduce);
stage 3 moves 3Ψ for the blocks (all-gather in forward, again in backward, reduce-scatter) and
2Ψ for the root bucket (embeddings, norms, heads), which stays gathered from the start of forward
to the end of backward because it is used outside any block's forward.

Stage 3's parameter lifecycle (gather before a block runs, prefetch the next, free after, the
same again in backward) is :class:`~maws_fast.parallel.buckets.GatheredParams`'s; the engine calls
it at the edges of a step.

Gradient reduction is launched from per-parameter post-accumulate-grad hooks as soon as a bucket
is complete, asynchronously, so it overlaps the rest of backward; buckets are launched in index
order on every rank, so the collectives match. Under :meth:`ZeroEngine.no_sync` (gradient
accumulation) nothing is communicated until the last micro-batch.
"""
from __future__ import annotations

import contextlib

import torch
import torch.distributed as dist
import torch.nn as nn

import maws_kernels
from maws_fast.parallel.buckets import Bucket, GatheredParams, Run, all_gather, reduce_scatter
from maws_fast.parallel.mesh import Mesh, ParallelLayout
from maws_fast.parallel.tensor import Piece, TPSplit, tp_layout, transformer_blocks

_DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16}
# Gradient buckets being reduced at once (stages 2-3): each holds a bucket-sized flat copy of its
# grads until its reduce-scatter is done, so this bounds the transient memory of backward.
MAX_IN_FLIGHT = 2


class ZeroEngine:
    """Our data-parallel engine: ZeRO stage 0-3 over ``mesh.dp_group`` (see the module docstring).

    Built by :func:`maws_fast.parallel.engine.build_engine`, after tensor parallelism, activation
    checkpointing and compile are applied to the network (the stage-3 hooks it puts on each block
    run around the block's compiled body).

    Args:
        objective: module whose ``forward(imgs, targets, step, micro, accum)`` returns the loss; its
            ``model`` attribute is the network (parameter names are taken relative to it: timm keys).
        mesh: process mesh (TP must already be applied to the network).
        layout: the validated layout: ``zero_stage`` 0-3, ``bucket_mb`` (MiB of model-dtype elements,
            stages 0-2; stage 3 uses one bucket per transformer block plus one for the rest),
            ``prefetch`` (stage 3: all-gather the next block while the current one runs),
            ``param_dtype`` ("fp32" or "bf16": bf16 model copy, fp32 master in the optimizer).
        groups: the AdamW param groups by name, ``[(options, names)]`` (see
            :func:`maws_fast.parallel.engine.named_groups`); a group's ``weight_decay`` defaults to 0,
            its ``lr_scale`` (the step's lr multiplier: layer-wise decay) to 1.
        betas, eps: AdamW constants.
        device: where the buffers live.
        kernel_backend: maws_kernels backend of the fused AdamW (None = best).

    Attributes:
        objective: what training calls for the loss (the objective itself: this engine wraps nothing).
        model: the network, ``objective.model``.
    """

    name = "ours"

    def __init__(self, objective: nn.Module, mesh: Mesh, layout: ParallelLayout, groups: list[tuple[dict, list[str]]],
                 betas=(0.9, 0.999), eps: float = 1e-8, device: torch.device | str = "cpu",
                 kernel_backend: str | None = None):
        self.objective, self.model, self.mesh = objective, objective.model, mesh
        self.stage, self.prefetch = layout.zero_stage, layout.prefetch
        self.betas, self.eps = tuple(betas), eps
        self.group_decay = [float(opts.get("weight_decay", 0.0)) for opts, _ in groups]
        self.group_lr_scale = [float(opts.get("lr_scale", 1.0)) for opts, _ in groups]
        self._group_of = {n: i for i, (_, names) in enumerate(groups) for n in names}
        self.dtype = _DTYPES[layout.param_dtype]
        self.device = torch.device(device)
        self.kernel_backend = kernel_backend
        self.dp = mesh.dims.dp
        self.group = mesh.dp_group
        stage = self.stage
        # Stage 0 replicates the optimizer: every rank "owns" the whole bucket.
        self.shard_world = self.dp if stage >= 1 else 1
        self.shard_rank = mesh.dp_rank if stage >= 1 else 0
        self.step_count = 0
        self._sync = True
        self._next_launch = 0
        self._in_flight: list[Bucket] = []  # launched reductions not yet waited for, oldest first
        self.tp_splits: dict[str, TPSplit] = tp_layout(self.model)
        self.buckets = self._build_buckets(layout.bucket_mb)
        self._hooks = []
        self._init_buffers()
        if self.dtype != torch.float32:
            self._run_in_model_dtype()
        self.gathering: GatheredParams | None = None
        if stage == 3:
            self.gathering = GatheredParams(self.buckets, transformer_blocks(self.model), [self.objective, self.model],
                                             self.group, self.shard_world, self.prefetch, self._hooks)
        for b in self.buckets:
            for i, p in enumerate(b.params):
                self._hooks.append(p.register_post_accumulate_grad_hook(self._grad_hook(b, i)))
        if self.gathering is not None:
            for b in self.buckets:
                if b is not self.gathering.root:
                    self.gathering.free(b)

    # --- layout -------------------------------------------------------------------------------
    def _named_trainable(self) -> list[tuple[str, nn.Parameter]]:
        return [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]

    def _build_buckets(self, bucket_mb: float) -> list[Bucket]:
        named = self._named_trainable()
        groups: list[list[tuple[str, nn.Parameter]]] = []
        if self.stage == 3:
            # One bucket per block, in backward order (decoder last block first), the rest last.
            in_block = set()
            for prefix, blk in reversed(transformer_blocks(self.model)):
                members = [(f"{prefix}.{n}", p) for n, p in blk.named_parameters() if p.requires_grad]
                in_block.update(n for n, _ in members)
                if members:
                    groups.append(members)
            rest = [(n, p) for n, p in named if n not in in_block]
            if rest:
                groups.append(rest)
        else:
            # Reverse registration order approximates the order backward produces the grads.
            cap = max(1, int(bucket_mb * 2**20 / self.dtype.itemsize))
            cur, size = [], 0
            for n, p in reversed(named):
                if cur and size + p.numel() > cap:
                    groups.append(cur)
                    cur, size = [], 0
                cur.append((n, p))
                size += p.numel()
            if cur:
                groups.append(cur)
        buckets = []
        for i, members in enumerate(groups):
            members = sorted(members, key=lambda np_: (self._group_of[np_[0]], np_[0] not in self.tp_splits))
            offsets, off = [], 0
            for _, p in members:
                offsets.append(off)
                off += p.numel()
            padded = -(-off // self.shard_world) * self.shard_world
            b = Bucket(i, [n for n, _ in members], [p for _, p in members], offsets, off, padded,
                       padded // self.shard_world)
            b.runs = self._runs(b, members)
            buckets.append(b)
        return buckets

    def _runs(self, b: Bucket, members) -> list[Run]:
        """Cut this rank's chunk into stretches of one (param group, TP-sharded) kind."""
        lo, hi = self.shard_rank * b.chunk, (self.shard_rank + 1) * b.chunk
        runs: list[Run] = []
        for (n, p), off in zip(members, b.offsets):
            s, e = max(lo, off), min(hi, off + p.numel())
            if s >= e:
                continue
            kind = (self._group_of[n], n in self.tp_splits)
            if runs and (runs[-1].group, runs[-1].tp_sharded) == kind and runs[-1].end == s - lo:
                runs[-1].end = e - lo
            else:
                runs.append(Run(s - lo, e - lo, *kind))
        return runs

    def _init_buffers(self) -> None:
        dev, dt = self.device, self.dtype
        for b in self.buckets:
            lo = self.shard_rank * b.chunk
            master = None
            if dt != torch.float32:  # the fp32 master starts from the fp32 weights, not their bf16 rounding
                flat32 = torch.zeros(b.padded, dtype=torch.float32, device=dev)
                for p, off in zip(b.params, b.offsets):
                    flat32[off:off + p.numel()].copy_(p.detach().reshape(-1))
                master = flat32[lo:lo + b.chunk].clone()
                del flat32
            b.full = torch.zeros(b.padded, dtype=dt, device=dev)
            with torch.no_grad():
                for p, off in zip(b.params, b.offsets):
                    b.full[off:off + p.numel()].copy_(p.detach().reshape(-1))
                    p.data = b.full[off:off + p.numel()].view(p.shape)
            if self.stage == 3 and self.shard_world > 1:
                b.shard = b.full[lo:lo + b.chunk].clone()
            else:
                b.shard = b.full[lo:lo + b.chunk]
            b.master = b.shard if master is None else master
            b.exp_avg = torch.zeros(b.chunk, dtype=torch.float32, device=dev)
            b.exp_avg_sq = torch.zeros(b.chunk, dtype=torch.float32, device=dev)
            if self.stage <= 1:
                b.grad_full = torch.zeros(b.padded, dtype=dt, device=dev)
                for p, off in zip(b.params, b.offsets):
                    p.grad = b.grad_full[off:off + p.numel()].view(p.shape)  # autograd accumulates in place
            if self.stage == 0 or self.shard_world == 1:
                b.grad_shard = b.grad_full if b.grad_full is not None else torch.zeros(b.chunk, dtype=dt, device=dev)
            else:
                b.grad_shard = torch.zeros(b.chunk, dtype=dt, device=dev)

    def _run_in_model_dtype(self) -> None:
        """A bf16 model computes in bf16 end to end, as FSDP2's MixedPrecisionPolicy does: the frozen
        tensors (sin-cos pos-embeds) and the images are cast too, or they would promote activations
        back to fp32 against bf16 weights."""
        with torch.no_grad():
            for p in self.model.parameters():
                if not p.requires_grad and p.is_floating_point():
                    p.data = p.data.to(self.dtype)

        def cast_images(_module, args, kwargs):
            if args and torch.is_tensor(args[0]) and args[0].is_floating_point():
                args = (args[0].to(self.dtype), *args[1:])
            return args, kwargs

        self._hooks.append(self.objective.register_forward_pre_hook(cast_images, with_kwargs=True))

    # --- gradient reduction ------------------------------------------------------------------
    def _grad_hook(self, b: Bucket, index: int):
        def hook(_p):
            b.got_grad.add(index)
            b.pending -= 1
            if b.pending == 0 and self._sync:
                self._launch_ready()
        return hook

    def _launch_ready(self, force: bool = False) -> None:
        """Launch complete buckets in index order (the same order on every rank)."""
        while self._next_launch < len(self.buckets):
            b = self.buckets[self._next_launch]
            if b.pending > 0 and not force:
                return
            self._launch(b)
            self._next_launch += 1

    def _launch(self, b: Bucket) -> None:
        if self.stage <= 1:
            flat = b.grad_full
        else:
            flat = torch.zeros(b.padded, dtype=self.dtype, device=self.device)  # padding and absent grads stay 0
            for p, off in zip(b.params, b.offsets):
                if p.grad is not None:
                    flat[off:off + p.numel()].copy_(p.grad.reshape(-1))
                    p.grad = None  # the full gradient is freed: only the reduced chunk is kept
            b.tmp = flat
        if self.dp > 1:
            if self.stage == 0:
                b.work = dist.all_reduce(flat, group=self.group, async_op=True)
            else:
                b.work = reduce_scatter(b.grad_shard, flat, group=self.group, async_op=True)
        elif flat is not b.grad_shard:
            b.grad_shard.copy_(flat[:b.chunk])
        b.launched = True
        if self.gathering is not None:
            self.gathering.free(b)  # its grads are out, the gathered params are not needed any more
        if b.work is not None:
            self._in_flight.append(b)
            while len(self._in_flight) > MAX_IN_FLIGHT:  # waits for the oldest (on a GPU: the stream, not the CPU)
                self._wait_reduced(self._in_flight.pop(0))

    @staticmethod
    def _wait_reduced(b: Bucket) -> None:
        if b.work is not None:
            b.work.wait()
            b.work = None
        b.tmp = None  # the flat grads are sent: free them

    def _finish_reduction(self) -> None:
        self._launch_ready(force=True)  # buckets whose params got no grad reduce zeros
        for b in self._in_flight:
            self._wait_reduced(b)  # the CPU waits for the last reductions here (once per step)
        self._in_flight = []

    # --- the engine interface ----------------------------------------------------------------
    def zero_grad(self) -> None:
        """Start an optimizer step: clear grads, re-arm the hooks, gather the root (stage 3)."""
        for b in self.buckets:
            if b.grad_full is not None:
                b.grad_full.zero_()
            elif self._sync:
                for p in b.params:
                    p.grad = None
            b.pending, b.launched = len(b.params), False
            b.got_grad = set()
        self._next_launch = 0
        if self.gathering is not None:
            self.gathering.start_step()

    @contextlib.contextmanager
    def no_sync(self):
        """Micro-batches of gradient accumulation: grads accumulate locally, nothing is sent."""
        prev, self._sync = self._sync, False
        try:
            yield
        finally:
            self._sync = prev
            for b in self.buckets:  # the last micro-batch counts its grads afresh
                b.pending = len(b.params)

    def backward(self, loss: torch.Tensor) -> None:
        loss.backward()
        if self.gathering is not None and not self._sync:
            self.gathering.free_blocks()

    @torch.no_grad()
    def step(self, lr: float, clip_grad: float | None = None) -> torch.Tensor | None:
        """Finish the reduction, clip by the global norm, and run AdamW on this rank's chunks.

        Returns the global grad norm (a device tensor; no host sync) when clipping, else None.
        """
        self._finish_reduction()
        inv_dp = 1.0 / self.dp
        norm = None
        scale = None
        if clip_grad is not None:
            norm = self._global_norm() * inv_dp  # of the averaged gradient
            # torch.nn.utils.clip_grad_norm_'s formula, applied without reading the norm on the host
            scale = torch.clamp(clip_grad / (norm + 1e-6), max=1.0) * inv_dp
        self.step_count += 1
        for b in self.buckets:
            g = b.grad_shard  # this rank's reduced (summed) grads; the whole bucket at stage 0
            if scale is not None:
                g.mul_(scale.to(g.dtype))
            gs = None if scale is not None else inv_dp
            copy = b.shard if self.dtype != torch.float32 else None
            for r in self._runs_with_grads(b):
                maws_kernels.fused_adamw_(
                    b.master[r.start:r.end], g[r.start:r.end], b.exp_avg[r.start:r.end], b.exp_avg_sq[r.start:r.end],
                    step=self.step_count, lr=lr * self.group_lr_scale[r.group], beta1=self.betas[0],
                    beta2=self.betas[1], eps=self.eps,
                    weight_decay=self.group_decay[r.group],
                    model_copy=None if copy is None else copy[r.start:r.end],
                    grad_scale=None if gs == 1.0 else gs, backend=self.kernel_backend)
        if self.stage in (1, 2) and self.shard_world > 1:
            # In place: the shard is this rank's chunk of b.full (NCCL and gloo both accept that).
            works = [all_gather(b.full, b.shard, group=self.group, async_op=True) for b in self.buckets]
            for w in works:
                w.wait()
        if self.gathering is not None:
            self.gathering.end_step()
        return norm

    def _runs_with_grads(self, b: Bucket) -> list[Run]:
        """The runs to update: like torch.optim.AdamW, a param that got no gradient this step is left alone."""
        if len(b.got_grad) == len(b.params):
            return b.runs
        lo = self.shard_rank * b.chunk
        spans = [(max(lo, off) - lo, min(lo + b.chunk, off + p.numel()) - lo)
                 for i, (p, off) in enumerate(zip(b.params, b.offsets)) if i in b.got_grad]
        return [Run(max(r.start, s), min(r.end, e), r.group, r.tp_sharded)
                for r in b.runs for s, e in spans if max(r.start, s) < min(r.end, e)]

    def _global_norm(self) -> torch.Tensor:
        """L2 norm of the (summed) gradient over DP shards and TP ranks, as a device tensor."""
        sq = torch.zeros(2, dtype=torch.float32, device=self.device)  # [TP-sharded, replicated]
        for b in self.buckets:
            for r in b.runs:
                g = b.grad_shard
                sq[0 if r.tp_sharded else 1] += g[r.start:r.end].float().pow(2).sum()
        if self.shard_world > 1:
            dist.all_reduce(sq, group=self.group)
        if self.mesh.tp_group is not None:
            part = sq[:1].clone()
            dist.all_reduce(part, group=self.mesh.tp_group)  # each TP rank holds a different slice
            sq[0] = part[0]
        return sq.sum().sqrt()

    # --- state ---------------------------------------------------------------------------------
    def memory_report(self) -> dict[str, int]:
        """Persistent model-state bytes on this rank: params, grads, optimizer state."""
        def nbytes(t):
            return 0 if t is None else t.numel() * t.element_size()

        params = sum(nbytes(b.shard) if self.stage == 3 and self.shard_world > 1 else nbytes(b.full)
                     for b in self.buckets)
        grads = sum(nbytes(b.grad_full) + (nbytes(b.grad_shard) if b.grad_shard is not b.grad_full else 0)
                    for b in self.buckets)
        optim = sum(nbytes(b.exp_avg) + nbytes(b.exp_avg_sq) + (nbytes(b.master) if b.master is not b.shard else 0)
                    for b in self.buckets)
        return {"params": params, "grads": grads, "optim": optim}

    def _piece_slices(self):
        """(bucket, param index, Piece, chunk slice) for every trainable param of this rank."""
        lo_r = self.shard_rank
        tp_rank, tp_size = self.mesh.tp_rank, self.mesh.dims.tp
        for b in self.buckets:
            lo, hi = lo_r * b.chunk, (lo_r + 1) * b.chunk
            for i, (n, p, off) in enumerate(zip(b.names, b.params, b.offsets)):
                s, e = max(lo, off), min(hi, off + p.numel())
                s, e = (s, e) if s < e else (off, off)
                split = self.tp_splits.get(n)
                shape = list(p.shape)
                if split is not None:
                    shape[split.dim] *= tp_size
                yield b, Piece(n, tuple(shape), split, tp_rank, tp_size, s - off, e - off), slice(s - lo, e - lo)

    def _save_range(self, pc: Piece) -> tuple[int, int]:
        """The sub-range of ``pc`` this rank writes: all of it, or 1/N when DP ranks replicate it (stage 0)."""
        if self.shard_world > 1 or self.dp == 1:
            return 0, pc.end - pc.start
        n = pc.end - pc.start
        c = -(-n // self.dp)
        r = self.mesh.dp_rank
        return min(n, r * c), min(n, (r + 1) * c)

    def pieces(self) -> list[Piece]:
        """What this rank writes to a sharded checkpoint (every element by exactly one DP rank)."""
        out = []
        for _, pc, _ in self._piece_slices():
            s, e = self._save_range(pc)
            out.append(Piece(pc.key, pc.shape, pc.tp, pc.tp_rank, pc.tp_size, pc.start + s, pc.start + e))
        return out

    def load_pieces(self) -> list[Piece]:
        """What this rank needs from a checkpoint: the elements it owns."""
        return [pc for _, pc, _ in self._piece_slices()]

    def shard_tensors(self) -> dict[str, dict[str, torch.Tensor]]:
        out = {}
        for b, pc, sl in self._piece_slices():
            s, e = self._save_range(pc)
            sub = slice(sl.start + s, sl.start + e)
            out[pc.key] = {"param": b.master[sub], "exp_avg": b.exp_avg[sub], "exp_avg_sq": b.exp_avg_sq[sub]}
        return out

    @torch.no_grad()
    def load_shard_tensors(self, tensors: dict[str, dict[str, torch.Tensor]], step_count: int | None) -> None:
        """Copy checkpoint pieces (from :meth:`shard_tensors`' layout) in, then refresh every copy."""
        for b, pc, sl in self._piece_slices():
            t = tensors[pc.key]
            b.master[sl].copy_(t["param"])
            if step_count is not None:
                b.exp_avg[sl].copy_(t["exp_avg"])
                b.exp_avg_sq[sl].copy_(t["exp_avg_sq"])
        if step_count is not None:
            self.step_count = int(step_count)
        for b in self.buckets:
            if b.master is not b.shard:
                b.shard.copy_(b.master)
            if self.gathering is not None and self.shard_world > 1:
                self.gathering.regather(b)
            elif self.shard_world > 1:
                all_gather(b.full, b.shard, group=self.group)

    @torch.no_grad()
    def full_state_dict(self) -> dict[str, torch.Tensor]:
        """Every trainable param in fp32 (the master), DP-gathered but still TP-local, by name. Collective."""
        out = {}
        for b in self.buckets:
            if self.shard_world > 1:
                full = torch.empty(b.padded, dtype=torch.float32, device=self.device)
                all_gather(full, b.master.contiguous(), group=self.group)
            else:
                full = b.master
            for n, p, off in zip(b.names, b.params, b.offsets):
                out[n] = full[off:off + p.numel()].view(p.shape).clone()
        return out

    def close(self) -> None:
        for h in self._hooks:
            h.remove()
        self._hooks = []


def theory_comm_elements(engine: ZeroEngine) -> int:
    """Elements one optimizer step communicates over DP (the 2Ψ / 3Ψ accounting), excluding the norm."""
    if engine.dp == 1:
        return 0
    total = 0
    for b in engine.buckets:
        per = 3 if engine.gathering is not None and b is not engine.gathering.root else 2
        total += per * b.padded
    return total
