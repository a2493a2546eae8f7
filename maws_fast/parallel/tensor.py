"""Tensor parallelism, applied to a model from outside (the model never imports torch.distributed).

Megatron's split of a pre-norm ViT block over ``tp`` ranks that all see the same batch:

* ``attn.qkv`` and ``mlp.fc1`` are column parallel: each rank holds 1/tp of the output features
  (for qkv: 1/tp of the heads of each of q, k and v) and computes its slice; the input is the
  replicated activation, whose gradient is all-reduced over TP in backward.
* ``attn.proj`` and ``mlp.fc2`` are row parallel: each rank holds 1/tp of the input features,
  computes a partial product, and the partials are all-reduced in forward; the bias is added once
  after the sum.

So every block costs two all-reduces of (B, N, D) in forward and two in backward, and attention
runs on num_heads / tp local heads. Norms, embeddings, the MAE decoder's in/out projections and
the classification head stay replicated; their gradients come out identical on every TP rank.
"""
from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.distributed as dist
import torch.nn as nn
import torch.nn.functional as F

from maws_fast.errors import ConfigError


@dataclass(frozen=True)
class TPSplit:
    """How a TP-sharded tensor is cut from the full one.

    The full tensor's ``dim`` is viewed as ``(groups, n / groups)`` and each group is chunked
    evenly over the TP ranks; TP rank t keeps chunk t of every group. qkv: dim 0, groups 3
    (q, k and v each split by heads); fc1: dim 0, groups 1; proj / fc2 weight: dim 1, groups 1.
    """

    dim: int
    groups: int = 1


@dataclass(frozen=True)
class Piece:
    """The elements of one parameter a rank holds (the unit of sharded checkpoints).

    Attributes:
        key: the parameter's state-dict key (timm names).
        shape: the FULL (unsharded) shape.
        tp: how the tensor is split over TP ranks, or None when every TP rank holds all of it.
        tp_rank, tp_size: this rank's TP coordinate.
        start, end: range of elements of the flattened TP-local tensor held here (may be empty).
    """

    key: str
    shape: tuple[int, ...]
    tp: TPSplit | None
    tp_rank: int
    tp_size: int
    start: int
    end: int


def tp_local(full: torch.Tensor, split: TPSplit | None, tp_rank: int, tp_size: int) -> torch.Tensor:
    """TP rank ``tp_rank``'s contiguous slice of ``full`` under ``split`` (all of it if None)."""
    if split is None or tp_size == 1:
        return full.contiguous()
    split = TPSplit(split.dim % full.ndim, split.groups)
    n = full.shape[split.dim]
    if n % (split.groups * tp_size):
        raise ConfigError(f"config: parallel.tp={tp_size}: a dimension of size {n} ({split.groups} groups) does not "
                          f"split over {tp_size} ranks; choose a tp that divides every width and head count")
    g = full.unflatten(split.dim, (split.groups, n // split.groups))  # (..., groups, n/groups, ...)
    return g.chunk(tp_size, dim=split.dim + 1)[tp_rank].flatten(split.dim, split.dim + 1).contiguous()


def tp_full(locals_: list[torch.Tensor], split: TPSplit | None) -> torch.Tensor:
    """Inverse of :func:`tp_local`: the full tensor from every TP rank's slice, in TP-rank order."""
    if split is None or len(locals_) == 1:
        return locals_[0]
    split = TPSplit(split.dim % locals_[0].ndim, split.groups)
    parts = [t.unflatten(split.dim, (split.groups, t.shape[split.dim] // split.groups)) for t in locals_]
    return torch.cat(parts, dim=split.dim + 1).flatten(split.dim, split.dim + 1)


# --- the two collectives of a TP block, as autograd functions ---------------------------------
class _CopyToTP(torch.autograd.Function):
    """Identity in forward; all-reduce of the input gradient over TP in backward."""

    @staticmethod
    def forward(ctx, x, group):
        ctx.group = group
        return x

    @staticmethod
    def backward(ctx, grad):
        grad = grad.contiguous()
        dist.all_reduce(grad, group=ctx.group)
        return grad, None


class _ReduceFromTP(torch.autograd.Function):
    """All-reduce of partial sums over TP in forward; identity in backward."""

    @staticmethod
    def forward(ctx, x, group):
        x = x.contiguous()
        dist.all_reduce(x, group=group)
        return x

    @staticmethod
    def backward(ctx, grad):
        return grad, None


class ColumnParallelLinear(nn.Module):
    """The output-feature slice of a Linear (same ``weight`` / ``bias`` names, local shapes)."""

    def __init__(self, linear: nn.Linear, split: TPSplit, tp_rank: int, tp_size: int, group):
        super().__init__()
        self.group, self.tp_size = group, tp_size
        self.weight = nn.Parameter(tp_local(linear.weight.detach(), split, tp_rank, tp_size))
        self.bias = nn.Parameter(tp_local(linear.bias.detach(), split, tp_rank, tp_size)) if linear.bias is not None else None
        self.tp_splits = {"weight": split, "bias": split}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(_CopyToTP.apply(x, self.group), self.weight, self.bias)

    def forward_without_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """This rank's output slice without the bias, and the bias slice, for a fused bias kernel."""
        return F.linear(_CopyToTP.apply(x, self.group), self.weight), self.bias


class RowParallelLinear(nn.Module):
    """The input-feature slice of a Linear; partial products are summed over TP, then the bias."""

    def __init__(self, linear: nn.Linear, tp_rank: int, tp_size: int, group):
        super().__init__()
        self.group = group
        self.weight = nn.Parameter(tp_local(linear.weight.detach(), TPSplit(1), tp_rank, tp_size))
        self.bias = nn.Parameter(linear.bias.detach().clone()) if linear.bias is not None else None
        self.tp_splits = {"weight": TPSplit(1)}

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        y = _ReduceFromTP.apply(F.linear(x, self.weight), self.group)  # (..., D): sum of the TP partials
        return y + self.bias if self.bias is not None else y

    def forward_without_bias(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The summed partial products without the (replicated) bias, and the bias, for a fused kernel."""
        return _ReduceFromTP.apply(F.linear(x, self.weight), self.group), self.bias


# A TP plan: module-name suffix inside a block -> how it is split (torchtitan's dict style).
BLOCK_PLAN = {
    "attn.qkv": ("colwise", TPSplit(0, groups=3)),
    "attn.proj": ("rowwise", None),
    "mlp.fc1": ("colwise", TPSplit(0)),
    "mlp.fc2": ("rowwise", None),
}


def transformer_blocks(model: nn.Module) -> list[tuple[str, nn.Module]]:
    """``(name, block)`` of every transformer block of the model: the encoder's and, for an MAE, the decoder's.

    The unit that tensor parallelism splits, activation checkpointing and compile then wrap (per block,
    between TP and the engine: maws_fast.train.parallelize), and FSDP2 and ZeRO-3 shard last.
    """
    out = []
    for list_name in ("blocks", "decoder_blocks"):
        for i, blk in enumerate(getattr(model, list_name, [])):
            out.append((f"{list_name}.{i}", blk))
    return out


def apply_tensor_parallel(model: nn.Module, tp_rank: int, tp_size: int, group) -> nn.Module:
    """Split every block of ``model`` over ``tp_size`` ranks in place (see the module docstring).

    The model must hold the same full weights on every rank (same seed, or loaded). Raises a
    ConfigError when tp does not divide a head count or a width.
    """
    if tp_size == 1:
        return model
    for name, blk in transformer_blocks(model):
        heads = blk.attn.num_heads
        if heads % tp_size:
            raise ConfigError(f"config: parallel.tp={tp_size} does not divide the {heads} heads of {name}; "
                              f"choose a tp that divides every head count (encoder and decoder)")
        for suffix, (style, split) in BLOCK_PLAN.items():
            parent_name, _, leaf = suffix.rpartition(".")
            parent = blk.get_submodule(parent_name)
            linear = getattr(parent, leaf)
            new = (ColumnParallelLinear(linear, split, tp_rank, tp_size, group) if style == "colwise"
                   else RowParallelLinear(linear, tp_rank, tp_size, group))
            setattr(parent, leaf, new)
        blk.attn.num_heads = heads // tp_size  # local heads; head_dim is unchanged
    return model


def tp_layout(model: nn.Module) -> dict[str, TPSplit]:
    """State-dict key -> TPSplit of every TP-sharded parameter (absent keys are replicated)."""
    out = {}
    for mod_name, mod in model.named_modules():
        for pname, split in getattr(mod, "tp_splits", {}).items():
            if getattr(mod, pname, None) is not None:
                out[f"{mod_name}.{pname}" if mod_name else pname] = split
    return out
