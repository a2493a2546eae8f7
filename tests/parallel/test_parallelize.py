"""``maws_fast.train.parallelize.parallelize``: TP -> activation checkpointing -> compile -> the engine.

One process. The mesh says tp=2 without a process group: building the split layers and the engine
communicates nothing (no forward runs here), which is enough to see what each step finds in
place. The numbers of every layout against one process are tests/parallel/test_engines.py.
"""
import pytest
import torch.nn as nn

import maws_fast.train.parallelize as par
import maws_fast.train.regional_compile as rc
from maws_fast.config import ParallelConfig, RunConfig
from maws_fast.errors import ConfigError
from maws_fast.models.vit import Block
from maws_fast.parallel.engine import AdamWSpec
from maws_fast.parallel.mesh import Mesh, ParallelDims, single_process
from maws_fast.parallel.tensor import ColumnParallelLinear, RowParallelLinear
from maws_fast.parallel.zero import ZeroEngine
from maws_fast.train.optim import param_groups
from tests.parallel.dist_harness import build


def _blocks(model) -> list[Block]:
    return [m for m in model.modules() if isinstance(m, Block)]


def _split(model) -> bool:
    return all(isinstance(b.attn.qkv, ColumnParallelLinear) and isinstance(b.mlp.fc2, RowParallelLinear)
               for b in _blocks(model))


def _hooked(model) -> bool:
    return all(b._forward_pre_hooks for b in _blocks(model))


def test_parallelize_applies_tp_then_checkpointing_and_compile_then_the_engine(monkeypatch):
    model, make, _, _ = build("mae")
    obj = make(model, 0, 1)
    adamw = AdamWSpec.of(model, param_groups(model, 0.05))  # by name, on the unsplit model
    seen = []

    def spy(name, real, check):
        def wrapped(*args, **kwargs):
            check()
            seen.append(name)
            return real(*args, **kwargs)
        return wrapped

    def before_tp():  # nothing applied yet
        assert not _split(model) and all(b.activation_checkpoint == "none" and b._compiled is None
                                         for b in _blocks(model))

    def before_block_options():  # TP's layers in, no engine hook yet
        assert _split(model) and not any(b._forward_pre_hooks for b in _blocks(model))

    def before_engine():  # checkpoint mode and compiled body set on the split blocks, still no hook
        assert _split(model) and not any(b._forward_pre_hooks for b in _blocks(model))
        assert all(b.activation_checkpoint == "selective" and b._compiled is not None for b in _blocks(model))

    monkeypatch.setattr(par, "apply_tensor_parallel", spy("tp", par.apply_tensor_parallel, before_tp))
    monkeypatch.setattr(rc, "set_block_options", spy("ac+compile", rc.set_block_options, before_block_options))
    monkeypatch.setattr(par, "build_engine", spy("engine", par.build_engine, before_engine))
    mesh = Mesh(ParallelDims(2, 2))  # tp 2, dp 1; no process group (nothing is communicated here)
    parallel = ParallelConfig(engine="ours", zero_stage=3, tp=2, param_dtype="fp32")
    run = RunConfig(activation_checkpoint="selective", compile=True)
    with rc.compile_scope("order", model, run.compile, backend="eager") as compiled:
        engine = par.parallelize(obj, mesh, parallel, run, adamw, "cpu", compiled=compiled)
        assert seen == ["tp", "ac+compile", "engine"]
        assert compiled.blocks == len(_blocks(model)) > 0
        # the engine's ZeRO-3 gathers hook the blocks; their options stay as set (the hooks run around them)
        assert isinstance(engine, ZeroEngine) and _hooked(model)
        assert all(b.activation_checkpoint == "selective" and b._compiled is not None for b in _blocks(model))
        assert engine.objective is obj and engine.model is model
        engine.close()


@pytest.mark.parametrize("engine", ["ours", "ddp"])
def test_parallelize_without_compile_sets_the_checkpoint_mode_and_names_what_is_what(engine):
    model, make, _, _ = build("wsp")
    obj = make(model, 0, 1)
    eng = par.parallelize(obj, single_process(), ParallelConfig(engine=engine, zero_stage=0, param_dtype="fp32"),
                          RunConfig(activation_checkpoint="full"), AdamWSpec.of(model, param_groups(model, 0.05)), "cpu")
    assert all(b.activation_checkpoint == "full" and b._compiled is None for b in _blocks(model))
    # one process: DDP wraps nothing, so the objective training calls is the one handed in
    assert eng.objective is obj and eng.model is model and isinstance(eng.model, nn.Module)
    eng.close()


def test_a_bad_layout_is_refused_before_the_model_is_touched():
    model, make, _, _ = build("mae")
    with pytest.raises(ConfigError, match="parallel.tp=1 but the process mesh was built with tp=2"):
        par.parallelize(make(model, 0, 1), Mesh(ParallelDims(2, 2)), ParallelConfig(zero_stage=0, param_dtype="fp32"),
                        RunConfig(activation_checkpoint="full"), AdamWSpec.of(model, param_groups(model, 0.05)), "cpu")
    assert not _split(model) and all(b.activation_checkpoint == "none" for b in _blocks(model))
