"""The largest per-GPU batch that fits an 80 GB (H100) or 141 GB (H200) GPU: COMPUTED, not measured.

For each preset, stage (MAE, WSP), engine and activation-checkpoint mode::

    batch = floor((HEADROOM * capacity - model state per rank - working set) / activations per image)

* activations per image: counted (:func:`maws_fast.bench.traffic.per_image`, fake tensors, the GPU
  path: bf16 weights, the fused kernels) as the storages a forward leaves alive for backward, at
  batch 2B minus batch B, in the given checkpointing mode; a checkpointing mode adds what backward
  recomputes for the one block it is in, (none - mode) / blocks;
* model state per rank (Ψ trainable parameters, N data-parallel ranks, the GPU default of bf16
  weights with fp32 master weights and AdamW moments: 2 + 2 + 12 bytes per parameter, which the
  engine's ``memory_report`` shows at N = 1): ZeRO-0 keeps all of it, ZeRO-1 shards the 12, ZeRO-2
  the gradients too, ZeRO-3 and FSDP2 everything (the layouts in :mod:`maws_fast.parallel.zero`);
* working set: ZeRO-3 / FSDP2 hold two blocks gathered (the one running and the prefetched one)
  with their full gradients, and the root bucket (embeddings, norms, head) with its gradients;
* ``HEADROOM``: 10% of the GPU left to the allocator's fragmentation, GEMM workspaces, the CUDA
  context and the transient buffers of backward, which this count does not see.

A batch that fits here can still fail on a real GPU (a transient peak above the headroom); one that
does not fit here will not fit there. The rows say ``computed``.
"""
from __future__ import annotations

import math

import torch
from torch._subclasses.fake_tensor import FakeTensorMode


CAPACITY_GB = {"h100_80gb": 80, "h200_141gb": 141}
HEADROOM = 0.9
ENGINES = {"ours:2": ("ours", 2), "ours:3": ("ours", 3), "fsdp2": ("fsdp2", 3)}
WEIGHT, GRAD, OPTIM = 2, 2, 12  # bytes per parameter: bf16 weights and grads; fp32 master + m + v


def state_bytes(n_params: int, zero_stage: int, world: int) -> float:
    """Persistent model-state bytes on one rank for ZeRO ``zero_stage`` over ``world`` DP ranks."""
    w = n_params * WEIGHT / (world if zero_stage >= 3 else 1)
    g = n_params * GRAD / (world if zero_stage >= 2 else 1)
    o = n_params * OPTIM / (world if zero_stage >= 1 else 1)
    return w + g + o


def working_set_bytes(block_params: int, root_params: int, zero_stage: int) -> float:
    """Gathered parameters and full gradients a sharded step holds besides its shards."""
    if zero_stage < 3:
        return 0.0
    return 2 * block_params * (WEIGHT + GRAD) + root_params * (WEIGHT + GRAD)


def _param_counts(model: torch.nn.Module) -> tuple[int, int, int, int]:
    """(trainable parameters, the largest block's, those outside every block, blocks)."""
    from maws_fast.models.vit import Block

    total = sum(p.numel() for p in model.parameters() if p.requires_grad)
    blocks = [m for m in model.modules() if isinstance(m, Block)]
    in_blocks = {id(p) for b in blocks for p in b.parameters()}
    largest = max((sum(p.numel() for p in b.parameters() if p.requires_grad) for b in blocks), default=0)
    root = sum(p.numel() for p in model.parameters() if p.requires_grad and id(p) not in in_blocks)
    return total, largest, root, len(blocks)


def max_batch(free_bytes: float, act_per_image: float) -> int:
    return max(0, math.floor(free_bytes / act_per_image)) if act_per_image > 0 else 0


def fit_rows(presets: list[str], stages: list[str], engines: list[str], modes: list[str], world: dict[str, int],
             count_batch: int, build_model, act_counter) -> list[dict]:
    """One row per (preset, stage, engine, mode). ``build_model(stage, preset)`` builds the network
    (on fake tensors here: only its parameter counts are read); ``act_counter(stage, preset, mode)``
    returns the counted activation bytes per image; ``world[preset]`` the DP ranks of the sharding."""
    rows = []
    for preset in presets:
        for stage in stages:
            with FakeTensorMode():
                n, block, root, depth = _param_counts(build_model(stage, preset))
            live = {mode: act_counter(stage, preset, mode) for mode in {"none", *modes}}
            # + the recomputation of one block at a time in backward
            acts = {mode: live[mode] + (live["none"] - live[mode]) / max(depth, 1) for mode in modes}
            for engine in engines:
                zs = ENGINES[engine][1]
                N = world[preset]
                fixed = state_bytes(n, zs, N) + working_set_bytes(block, root, zs)
                for mode in modes:
                    row = {"bench": "fit", "stage": stage, "preset": preset, "engine": engine, "world": N,
                           "activation_checkpoint": mode, "params_m": round(n / 1e6, 1),
                           "state_gb_per_rank": round(fixed / 1e9, 2), "act_mb_per_img": round(acts[mode] / 1e6, 2),
                           "saved_mb_per_img": round(live[mode] / 1e6, 2),
                           "count_batch": count_batch, "computed": True}
                    for gpu, gb in CAPACITY_GB.items():
                        row[f"max_batch_{gpu}"] = max_batch(HEADROOM * gb * 1e9 - fixed, acts[mode])
                    rows.append(row)
    return rows
