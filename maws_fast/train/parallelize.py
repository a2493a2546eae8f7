"""``parallelize()``: a stage's parallelism, applied from outside the model in one fixed order.

torchtitan's order, each step on what the previous one left:

1. tensor parallel (:func:`~maws_fast.parallel.tensor.apply_tensor_parallel`): each block's qkv /
   fc1 / proj / fc2 swapped in place for column / row parallel layers over the TP group;
2. activation checkpointing and 3. regional compile
   (:func:`~maws_fast.models.vit.set_block_options`): per block, on the TP-split body. Both are
   attributes of the block (its checkpoint mode, its compiled ``_run``); the block's own
   ``__call__`` stays eager;
4. the data-parallel engine (:func:`~maws_fast.parallel.engine.build_engine`), last: it names the
   parameters the split left, and the hooks it puts on a block or around the objective (ZeRO-3's
   gathers, FSDP2's ``fully_shard``, which swaps the block's class in place, DDP's wrapper of the
   objective) run around the compiled body, never inside it.

Compile is lazy (a block is traced at its first call, in training), so the engine changing the
blocks' parameters afterwards (ZeRO's bucket views, FSDP2's shards) is what dynamo sees.

It lives in the train layer because it composes two layer-3 packages that may not import each
other (``parallel``: TP and the engines; ``models``: the blocks' options). Dynamo's scope for the
stage is the caller's (:func:`maws_fast.train.regional_compile.compile_scope`, opened before and
closed after training); it is handed in.
"""
from __future__ import annotations

import torch
import torch.nn as nn

from maws_fast.config import ParallelConfig, RunConfig
from maws_fast.models.vit import set_block_options
from maws_fast.parallel.engine import AdamWSpec, Engine, build_engine
from maws_fast.parallel.mesh import Mesh, ParallelLayout
from maws_fast.parallel.tensor import apply_tensor_parallel
from maws_fast.train.regional_compile import CompileScope


def apply_block_options(model: nn.Module, run: RunConfig, compiled: CompileScope | None) -> int:
    """``run.activation_checkpoint`` and ``run.compile`` on every block of ``model``; returns the blocks set.

    Raises:
        ValueError: ``run.compile`` without the stage's compile scope (dynamo's caches and recompile
            limit would not be scoped to this model).
    """
    if not run.compile:
        return set_block_options(model, run.activation_checkpoint)
    if compiled is None:
        raise ValueError("run.compile=true: open the stage's compile_scope (maws_fast.train.regional_compile) "
                         "around parallelize() and the training, and hand it in as compiled=")
    return compiled.compile_blocks(model, run.activation_checkpoint)


def parallelize(objective: nn.Module, mesh: Mesh, parallel: ParallelConfig, run: RunConfig, optimizer: AdamWSpec,
                device: torch.device | str, *, compiled: CompileScope | None = None) -> Engine:
    """Apply TP -> activation checkpointing -> compile -> the data-parallel engine to ``objective``.

    Args:
        objective: module with ``forward(imgs, targets, step, micro, accum) -> loss`` and the network as
            ``.model``, holding the same full weights on every rank; changed in place.
        mesh: from :func:`~maws_fast.parallel.mesh.init_distributed`.
        parallel: the resolved parallel settings (:func:`maws_fast.config.resolve_parallel`): engine, ZeRO
            stage, tp (the mesh's), weight dtype, buckets, prefetch.
        run: ``activation_checkpoint`` and ``compile`` are read.
        optimizer: the AdamW the engine owns: groups by name, betas, eps (:meth:`AdamWSpec.of`, built on
            the unsplit network).
        device: training device (where the engines' buffers live).
        compiled: the stage's open compile scope; needed when ``run.compile``.

    Returns:
        The engine; ``engine.objective`` is what training calls for the loss, ``engine.model`` the network.
        The fused AdamW of our engine runs on the network's kernel backend (``model.kernel_backend``).
    """
    layout = ParallelLayout.of(parallel, mesh.dims)  # every layout check, before anything is changed
    model = objective.model
    apply_tensor_parallel(model, mesh.tp_rank, mesh.dims.tp, mesh.tp_group)  # 1. TP (no-op at tp 1)
    apply_block_options(model, run, compiled)  # 2. + 3. activation checkpointing, compile: per block
    return build_engine(objective, mesh, layout, optimizer, device,  # 4. the engine, last
                        kernel_backend=getattr(model, "kernel_backend", None))
