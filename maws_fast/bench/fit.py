"""The largest per-GPU batch that fits an 80 GB (H100) or 141 GB (H200) GPU: COMPUTED, not measured.

For each preset, stage (MAE, WSP, fine-tune, LiT), resolution, engine and activation-checkpoint mode::

    batch = floor((HEADROOM * capacity - model state per rank - working set) / activations per image)

* the cases (:func:`fit_cases`): MAE, WSP and LiT at the preset's own resolution (224); the
  fine-tune at every resolution of :data:`RESOLUTIONS` its patch divides (224, 448, 512 at /16;
  224, 448, 518 at /14), the classifier as :func:`maws_fast.train.finetune.build_finetune_model`
  builds it (learned pos-embed, avg pool + ``fc_norm``, drop path) under its objective (Mixup /
  CutMix into soft targets, the head fused with its soft-target cross-entropy);
* activations per image: counted (:func:`maws_fast.bench.traffic.per_image`, fake tensors, the GPU
  path: bf16 weights, the fused kernels) as the storages a forward leaves alive for backward, at
  batch 2B minus batch B, in the given checkpointing mode; a checkpointing mode adds what backward
  recomputes for the one block it is in, (none - mode) / blocks, over the blocks that train;
* LiT (:func:`maws_fast.train.lit.lit_stage` on JPEGs: the locked image tower runs under no_grad
  every step, then the text tower, both projections and the contrastive loss train): what backward
  needs is only the text side's activations and the pooled image features, but the tower's forward
  at the same batch holds its own working set for a moment (one block's intermediates; nothing of it
  is kept). So a LiT row's activations per image are the larger of the forward's PEAK
  (:func:`forward_peak`: the most bytes of storages alive at once over the whole forward, per image)
  and the kept activations plus one text block's recomputation. The text tower is the ``lit``
  section's (its defaults: width 128, depth 4, a 40-token context), every caption counted at the full
  context (the worst case; packing drops the padding of shorter ones). The demo's feature cache
  skips the tower per step; its batch is bounded by the text side alone, which this table does not list;
* model state per rank (Ψ trainable parameters, N data-parallel ranks, the GPU default of bf16
  weights with fp32 master weights and AdamW moments: 2 + 2 + 12 bytes per parameter, which the
  engine's ``memory_report`` shows at N = 1): ZeRO-0 keeps all of it, ZeRO-1 shards the 12, ZeRO-2
  the gradients too, ZeRO-3 and FSDP2 everything (the layouts in :mod:`maws_fast.parallel.zero`).
  A LOCKED tower's parameters (LiT's image tower) are no model state of the engine: their bf16 copy
  (2 bytes each, cast by the engine, replicated on every rank, no gradient, no optimizer state) is
  added as they are (:data:`LOCKED`). MAE's fixed sin-cos pos-embeds (requires_grad False too,
  but not a tower) are left out as before: a few hundred KB;
* working set: ZeRO-3 / FSDP2 hold two blocks gathered (the one running and the prefetched one)
  with their full gradients, and the root bucket (embeddings, norms, head) with its gradients;
  both of trainable parameters only (a locked tower has no bucket);
* ``HEADROOM``: 10% of the GPU left to the allocator's fragmentation, GEMM workspaces, the CUDA
  context and the transient buffers of backward, which this count does not see.

A batch that fits here can still fail on a real GPU (a transient peak above the headroom); one that
does not fit here will not fit there. The rows say ``computed``.

Cost: a fake-tensor count costs per op, not per element, so a 6.5B/14 fine-tune at 518 px counts as
fast as at 224 px (its 32 blocks' ops: about 10 s per mode on two CPU cores); the whole table
(5 presets, 25 cases, 255 rows) takes about 5 minutes there, MAE and WSP alone about 1.5.
``maws-bench step --fit-stages / --fit-presets`` count a part.
"""
from __future__ import annotations

import math
from typing import Callable

import torch
from torch._subclasses.fake_tensor import FakeTensorMode
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten

CAPACITY_GB = {"h100_80gb": 80, "h200_141gb": 141}
HEADROOM = 0.9
ENGINES = {"ours:2": ("ours", 2), "ours:3": ("ours", 3), "fsdp2": ("fsdp2", 3)}
WEIGHT, GRAD, OPTIM = 2, 2, 12  # bytes per parameter: bf16 weights and grads; fp32 master + m + v
LOCKED = 2  # bytes per locked-tower parameter: its bf16 copy, on every rank
STAGES = ("mae", "wsp", "finetune", "lit")
RESOLUTIONS = (224, 448, 512, 518)  # fine-tune resolutions: MAWS's released heads are at 512 (/16) and 518 (/14)
# What a stage refuses to run under (maws_fast.train.lit.check_lit_config: FSDP2 would shard the locked tower).
REFUSED = {("lit", "fsdp2")}


def fit_cases(presets: list[str], stages: list[str]) -> list[tuple[str, str, int]]:
    """(stage, preset, resolution) of every row group: a fine-tune at each of :data:`RESOLUTIONS`
    the preset's patch size divides, the other stages at the preset's own ``img_size``."""
    from maws_fast.config import model_preset

    cases = []
    for preset in presets:
        cfg = model_preset(preset)
        for stage in stages:
            sizes = [r for r in RESOLUTIONS if r % cfg.patch_size == 0] if stage == "finetune" else [cfg.img_size]
            cases += [(stage, preset, r) for r in sizes]
    return cases


def state_bytes(n_params: int, zero_stage: int, world: int, locked: int = 0) -> float:
    """Persistent model-state bytes on one rank for ZeRO ``zero_stage`` over ``world`` DP ranks
    (``locked``: parameters of a locked tower, a bf16 copy on every rank)."""
    w = n_params * WEIGHT / (world if zero_stage >= 3 else 1)
    g = n_params * GRAD / (world if zero_stage >= 2 else 1)
    o = n_params * OPTIM / (world if zero_stage >= 1 else 1)
    return w + g + o + locked * LOCKED


def working_set_bytes(block_params: int, root_params: int, zero_stage: int) -> float:
    """Gathered parameters and full gradients a sharded step holds besides its shards."""
    if zero_stage < 3:
        return 0.0
    return 2 * block_params * (WEIGHT + GRAD) + root_params * (WEIGHT + GRAD)


def _param_counts(model: torch.nn.Module) -> tuple[int, int, int, int, int]:
    """(trainable parameters, the largest block's, trainable ones outside every block, blocks that
    train, parameters of a locked tower)."""
    from maws_fast.models.vit import Block

    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    blocks = [m for m in model.modules() if isinstance(m, Block) and any(p.requires_grad for p in m.parameters())]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    largest = max((sum(p.numel() for p in b.parameters() if p.requires_grad) for b in blocks), default=0)
    root = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in in_blocks)
    tower = model.vision_encoder if getattr(model, "vision_locked", False) else None
    locked = sum(p.numel() for p in tower.parameters()) if tower is not None else 0
    return total, largest, root, len(blocks), locked


def max_batch(free_bytes: float, act_per_image: float) -> int:
    return max(0, math.floor(free_bytes / act_per_image)) if act_per_image > 0 else 0


class PeakLive(TorchDispatchMode):
    """The most bytes of storages alive at once while active: after every op, the storages made
    under this mode (not a view's or an in-place op's: those are an input's) that something besides
    it still references (an op's inputs and outputs, a Python local, autograd's saved tensors).
    Storages made before (weights, inputs) are not counted. What an op allocates and frees inside itself (a fused
    kernel's scratch) is not seen. On fake tensors holding the storages costs nothing."""

    def __init__(self):
        super().__init__()
        self.storages: dict[int, torch.UntypedStorage] = {}
        self.peak = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        out = func(*args, **kwargs)
        # a view or an in-place op hands back an input's storage: made before (a weight) or already held
        inputs = {t.untyped_storage()._cdata for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if isinstance(t, torch.Tensor) and t.untyped_storage()._cdata not in inputs:
                s = t.untyped_storage()
                self.storages.setdefault(s._cdata, s)
        # a storage only this mode still holds is free: let go of it, sum the rest
        self.storages = {k: s for k, s in self.storages.items() if torch._C._storage_Use_Count(k) > 1}
        self.peak = max(self.peak, sum(s.nbytes() for s in self.storages.values()))
        return out


def forward_peak(build: Callable[[], Callable[[int], Callable[[], torch.Tensor]]], batch: int = 8) -> float:
    """Per image, (peak at 2 * batch - peak at batch) / batch of the storages alive at once during one
    forward (:class:`PeakLive`), on fake tensors on the GPU path; ``build`` as
    :func:`maws_fast.bench.traffic.per_image` takes it (inputs made outside the count). A custom op
    runs its fake kernel here (its output shapes), so no Triton launch is recorded or run."""
    from maws_fast.bench.traffic import gpu_path

    def peak(b: int) -> int:
        with FakeTensorMode(allow_non_fake_inputs=True), gpu_path():
            loss_fn = build()(b)
            with PeakLive() as mode:
                loss_fn()
        return mode.peak

    return (peak(2 * batch) - peak(batch)) / batch


def fit_rows(cases: list[tuple[str, str, int]], engines: list[str], modes: list[str], world: dict[str, int],
             count_batch: int, build_model, act_counter, peak_counter: Callable | None = None) -> list[dict]:
    """One row per (stage, preset, resolution) case, engine and mode. ``build_model(stage, preset, resolution)``
    builds the network (on fake tensors here: only its parameter counts are read);
    ``act_counter(stage, preset, resolution, mode)`` returns the counted activation bytes per image
    a forward keeps; ``peak_counter`` (same arguments, None for a stage without one) the forward's
    peak bytes per image, where a locked tower's forward may hold more for a moment; ``world[preset]``
    the DP ranks of the sharding. Engines a stage refuses (:data:`REFUSED`) get no row."""
    rows = []
    for stage, preset, resolution in cases:
        with FakeTensorMode():
            n, block, root, depth, locked = _param_counts(build_model(stage, preset, resolution))
        live = {mode: act_counter(stage, preset, resolution, mode) for mode in {"none", *modes}}
        peaks = {mode: peak_counter(stage, preset, resolution, mode) for mode in modes} if peak_counter else {}
        peaks = {mode: p for mode, p in peaks.items() if p is not None}
        # + the recomputation of one block at a time in backward; a forward's peak where it is higher
        acts = {mode: max(live[mode] + (live["none"] - live[mode]) / max(depth, 1), peaks.get(mode, 0.0))
                for mode in modes}
        for engine in engines:
            if (stage, engine) in REFUSED:
                continue
            zs = ENGINES[engine][1]
            N = world[preset]
            fixed = state_bytes(n, zs, N, locked) + working_set_bytes(block, root, zs)
            for mode in modes:
                row = {"bench": "fit", "stage": stage, "preset": preset, "resolution": resolution, "engine": engine,
                       "world": N, "activation_checkpoint": mode, "params_m": round(n / 1e6, 1),
                       "state_gb_per_rank": round(fixed / 1e9, 2), "act_mb_per_img": round(acts[mode] / 1e6, 2),
                       "saved_mb_per_img": round(live[mode] / 1e6, 2)}
                if locked:
                    row["locked_params_m"] = round(locked / 1e6, 1)
                if mode in peaks:
                    row["peak_mb_per_img"] = round(peaks[mode] / 1e6, 2)
                row.update(count_batch=count_batch, computed=True)
                for gpu, gb in CAPACITY_GB.items():
                    row[f"max_batch_{gpu}"] = max_batch(HEADROOM * gb * 1e9 - fixed, acts[mode])
                rows.append(row)
    return rows
