"""ZeRO's flat buckets (what one holds) and ZeRO-3's parameter lifecycle over them.

:class:`Bucket` is the record :class:`~maws_fast.parallel.zero.ZeroEngine` keeps per flat buffer (the
parameter views, this rank's chunk, its optimizer state and the reductions in flight);
:class:`GatheredParams` decides, at stage 3, when a bucket holds its full parameters.
"""
from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist
import torch.nn as nn

# torch 2.13 names these *_single (the *_into_tensor / *_tensor names are deprecated there); the GPU
# machine's torch 2.11 has only the old ones. Same arguments either way.
all_gather = getattr(dist, "all_gather_single", None) or dist.all_gather_into_tensor
reduce_scatter = getattr(dist, "reduce_scatter_single", None) or dist.reduce_scatter_tensor


@dataclass
class Run:
    """A stretch of one chunk with one weight decay and one TP kind (a fused AdamW launch)."""

    start: int  # within the chunk
    end: int
    group: int  # index of the param group (its weight decay)
    tp_sharded: bool


@dataclass
class Bucket:
    """One flat bucket: parameter views, this rank's chunk, and its optimizer state."""

    index: int
    names: list[str]
    params: list[nn.Parameter]
    offsets: list[int]  # start of each param in the flat bucket
    numel: int  # unpadded
    padded: int  # multiple of the shard world
    chunk: int  # padded / shard world
    runs: list[Run] = field(default_factory=list)
    full: torch.Tensor | None = None  # (padded,) model dtype; storage freed between uses at stage 3
    shard: torch.Tensor | None = None  # (chunk,) model dtype: this rank's params (a view of full below stage 3)
    master: torch.Tensor | None = None  # (chunk,) fp32 (the shard itself when the model dtype is fp32)
    exp_avg: torch.Tensor | None = None
    exp_avg_sq: torch.Tensor | None = None
    grad_full: torch.Tensor | None = None  # (padded,) stages 0-1: the params' .grad are views of it
    grad_shard: torch.Tensor | None = None  # (chunk,) reduced grads of this rank's chunk
    pending: int = 0  # params whose grad has not arrived this backward
    launched: bool = False
    gathered: bool = True
    gather_work: object = None  # stage 3: async all-gather of the params in flight (prefetch)
    work: object = None  # async gradient reduction in flight
    got_grad: set = field(default_factory=set)  # indices of params whose grad arrived this step
    tmp: torch.Tensor | None = None  # stages 2-3: the flat grads being reduce-scattered


def storage_free(t: torch.Tensor) -> None:
    t.untyped_storage().resize_(0)


def storage_alloc(t: torch.Tensor) -> None:
    nbytes = t.numel() * t.element_size()
    if t.untyped_storage().size() != nbytes:
        t.untyped_storage().resize_(nbytes)


class GatheredParams:
    """ZeRO-3: which buckets hold their full parameters when.

    A block's bucket is all-gathered just before the block runs (the next block's is prefetched,
    asynchronously, while this one computes) and freed after; in backward the same happens in
    reverse, started by a hook on the block's output. The root bucket (embeddings, norms, heads:
    used outside any block's forward) is gathered from :meth:`start_step` to :meth:`end_step`.
    With one data-parallel rank nothing is ever freed.
    """

    def __init__(self, buckets: list[Bucket], units: list[tuple[str, nn.Module]], roots: list[nn.Module],
                 group, shard_world: int, prefetch: bool, hooks: list):
        self.group, self.shard_world, self.prefetch = group, shard_world, prefetch
        self._units: dict[nn.Module, Bucket] = {}
        self.forward_order: list[Bucket] = []
        by_first_param = {b.params[0]: b for b in buckets}
        for _prefix, blk in units:
            params = [p for p in blk.parameters() if p.requires_grad]
            if not params:
                continue
            b = next(by_first_param[p] for p in params if p in by_first_param)
            self._units[blk] = b
            self.forward_order.append(b)
            hooks.append(blk.register_forward_pre_hook(self._pre_forward))
            hooks.append(blk.register_forward_hook(self._post_forward))
        self.root = buckets[-1] if len(self.forward_order) < len(buckets) else None
        if self.root is not None:
            # start_step() gathers the root ahead of time; a forward without it (evaluation between
            # step() and the next zero_grad(), through the objective or the network) gathers it here.
            for m in roots:
                hooks.append(m.register_forward_pre_hook(lambda *_: self.wait(self.root)))

    def gather(self, b: Bucket, async_op: bool = False) -> None:
        if b.gathered or b.gather_work is not None:
            return
        storage_alloc(b.full)
        if self.shard_world == 1:
            b.full.copy_(b.shard)
            b.gathered = True
            return
        work = all_gather(b.full, b.shard, group=self.group, async_op=async_op)
        if async_op:
            b.gather_work = work
        else:
            b.gathered = True

    def wait(self, b: Bucket) -> None:
        """Block until ``b``'s full parameters are there (gathering them now if nobody started to)."""
        if b.gather_work is not None:
            b.gather_work.wait()
            b.gather_work = None
            b.gathered = True
        elif not b.gathered:
            self.gather(b)

    def free(self, b: Bucket) -> None:
        """Release ``b``'s full params (a prefetch still in flight is waited for first)."""
        if self.shard_world == 1:
            return
        if b.gather_work is not None:  # e.g. a prefetched block the forward never ran
            b.gather_work.wait()
            b.gather_work = None
        storage_free(b.full)
        b.gathered = False

    def regather(self, b: Bucket) -> None:
        """After new shards were loaded: refresh the full params of a bucket that holds them."""
        if b is self.root or b.gathered:
            b.gathered = False
            self.gather(b)

    def start_step(self) -> None:
        if self.root is not None:
            self.wait(self.root)
        if self.prefetch and self.forward_order:
            self.gather(self.forward_order[0], async_op=True)

    def free_blocks(self) -> None:
        """Between micro-batches: accumulation keeps full grads, not gathered params."""
        for b in self.forward_order:
            self.free(b)

    def end_step(self) -> None:
        if self.root is not None:
            self.free(self.root)  # re-gathered with the new weights at the next start_step

    def _neighbour(self, b: Bucket, delta: int) -> Bucket | None:
        i = self.forward_order.index(b) + delta
        return self.forward_order[i] if 0 <= i < len(self.forward_order) else None

    def _pre_forward(self, module, args):
        b = self._units[module]
        self.wait(b)
        nxt = self._neighbour(b, +1)
        if self.prefetch and nxt is not None:
            self.gather(nxt, async_op=True)  # overlaps this block's compute

    def _post_forward(self, module, args, out):
        b = self._units[module]
        if torch.is_grad_enabled():
            # A block may return several tensors (a fused block hands on its stream and its unadded
            # MLP output): a hook on each, the first gradient to arrive gathers, the rest find it there.
            outs = out if isinstance(out, (tuple, list)) else (out,)
            hook = self._pre_backward_hook(b)
            for t in outs:
                if isinstance(t, torch.Tensor) and t.requires_grad:
                    t.register_hook(hook)
        self.free(b)  # the autograd graph keeps views of b.full; backward re-fills the same storage
        return None

    def _pre_backward_hook(self, b: Bucket):
        def hook(_grad):
            self.wait(b)  # no-op when an earlier output's hook already gathered b
            prev = self._neighbour(b, -1)
            if self.prefetch and prev is not None:
                self.gather(prev, async_op=True)
        return hook
