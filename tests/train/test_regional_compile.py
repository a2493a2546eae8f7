"""Regional compilation (``run.compile``) over a whole recipe in one process.

Every block of every model shares one code object, so without a per-stage scope dynamo's compiled
variants of MAE, WSP, fine-tune and LiT add up until its recompile limit fails the run. Here the
real stages run MAE -> WSP -> fine-tune -> LiT three times in one process (checkpointing none,
full, selective) under a dynamo backend that runs the captured graphs as they are (dynamo's
``eager``) and COUNTS them: every stage must compile, and every call of a compiled block must
run a compiled graph (nothing falls back to eager), LiT's too (its feature cache under no_grad and
its text tower's packed sequences).
"""
import pytest
import torch
import torch._dynamo

from maws_fast.config import RunConfig, load_config, model_preset
from maws_fast.data import fmnist
from maws_fast.data.demo import DemoData
from maws_fast.errors import ConfigError, UserError
from maws_fast.models import build_classifier, build_mae
from maws_fast.models.vit import Block
from maws_fast.train.parallelize import apply_block_options
from maws_fast.train.regional_compile import BACKEND_ENV, compile_backend, compile_scope, recompile_budget
from maws_fast.train.recipe import run_recipe

from conftest import needs_fmnist  # noqa: E402

BACKEND = "maws_test_counting_eager"


class CountingEager:
    """A dynamo backend: the captured graph runs as it is (dynamo's ``eager``); counts the graphs it
    is handed and the calls of them."""

    def __init__(self):
        self.graphs = 0
        self.calls = 0

    def __call__(self, gm, example_inputs):
        self.graphs += 1

        def run(*args):
            self.calls += 1
            return gm.forward(*args)

        return run


COUNTING = CountingEager()
torch._dynamo.register_backend(COUNTING, name=BACKEND)


class BlockCalls:
    """Calls of blocks that have a compiled body (a global forward hook): how many, how many under
    no_grad, how many on packed sequences."""

    def __init__(self):
        self.calls = self.no_grad = self.packed = 0

    def __call__(self, module, args, kwargs, output):
        if isinstance(module, Block) and module._compiled is not None:
            self.calls += 1
            self.no_grad += not torch.is_grad_enabled()
            self.packed += kwargs.get("seq") is not None


def _recipe_cfg(out, mode: str):
    return load_config(None, [
        f"--run.out_dir={out}", "--run.progress=false", "--run.compile=true", f"--run.activation_checkpoint={mode}",
        "--run.stages=[mae,wsp,finetune,lit]", "--run.log_every=1",
        "--model.embed_dim=32", "--model.depth=2", "--model.num_heads=2",
        "--model.decoder_embed_dim=16", "--model.decoder_num_heads=2", "--model.decoder_depth=1",
        "--mae.batch_size=64", "--mae.epochs=0.5", "--wsp.batch_size=64", "--wsp.epochs=0.5",
        "--wsp.compare_scratch=false", "--finetune.batch_size=64", "--finetune.epochs=0.5",
        "--finetune.drop_path=0.2", "--finetune.init=wsp", "--lit.init=wsp", "--lit.batch_size=64",
        "--lit.epochs=0.5", "--lit.width=32", "--lit.depth=2", "--lit.num_heads=2", "--lit.embed_dim=24",
        "--lit.context_length=40", "--lit.vocab_size=300",
    ])


@needs_fmnist
@pytest.mark.slow
def test_every_stage_of_three_recipes_compiles_in_one_process(tmp_path, monkeypatch):
    import maws_fast.train.recipe as recipe

    x, y = fmnist.load_fmnist(None, "train")
    tx, ty = fmnist.load_fmnist(None, "test")
    wx, wt = fmnist.make_weak_hashtags(x[:1000], y[:1000], 256, seed=0, drop_p=0.3, wrong_p=0.1)
    monkeypatch.setattr(recipe, "load_data", lambda cfg: DemoData(x[:256], y[:256], tx[:128], ty[:128], wx, wt))
    monkeypatch.setenv(BACKEND_ENV, BACKEND)
    blocks = BlockCalls()
    per_stage = []  # (mode, stage, summary line, graphs, graph calls, block calls, no_grad calls, packed calls)
    last = [0, 0, 0, 0, 0]

    def echo(line: str):
        if "regional compile (" not in line:
            return
        now = [COUNTING.graphs, COUNTING.calls, blocks.calls, blocks.no_grad, blocks.packed]
        per_stage.append((mode, line.split("]")[0][1:], line, *(a - b for a, b in zip(now, last))))
        last[:] = now

    hook = torch.nn.modules.module.register_module_forward_hook(blocks, with_kwargs=True)
    try:
        for mode in ("none", "full", "selective"):
            run_recipe(_recipe_cfg(tmp_path / mode, mode), echo=echo)
    finally:
        hook.remove()
    assert [(m, s) for m, s, *_ in per_stage] == [(m, s) for m in ("none", "full", "selective")
                                                  for s in ("mae", "wsp", "finetune", "lit")]
    for mode, stage, line, graphs, graph_calls, block_calls, no_grad, packed in per_stage:
        assert graphs >= 1, (mode, stage)
        assert f"): {graphs} graph(s)" in line, line  # the run's own line tells the truth
        # every call of a compiled block ran a compiled graph: no eager fallback anywhere
        assert graph_calls == block_calls > 0, (mode, stage, graph_calls, block_calls)
        if stage == "lit":  # the feature cache (no_grad) and the text tower's packed captions compiled too
            assert no_grad > 0 and packed > 0, (mode, no_grad, packed)
        if stage == "mae":
            assert graphs >= 2  # encoder and decoder blocks
    assert not torch._dynamo.utils.counters["graph_break"]


def test_runaway_recompiles_end_in_one_clear_error():
    """A block body that needs more variants than its stage's budget is one UserError naming the
    cause, never an eager fallback: 2 dtypes x 2 grad modes x 3 checkpoint modes x 2 defer flags."""
    model = build_classifier(model_preset("tiny"), 3)
    assert recompile_budget(model) == 8  # one kind of block
    blk = model.blocks[0]
    with pytest.raises(UserError, match=r"\[probe\] run.compile: the block bodies needed more than 8 compiled "
                                        r"variants .*--run.compile=false"):
        with compile_scope("probe", model, compile=True, backend="eager") as scope:
            scope.compile_blocks(model)
            for dtype in (torch.float32, torch.float64):
                blk.to(dtype)
                x = torch.randn(2, 5, model.embed_dim, dtype=dtype)
                for grad in (True, False):
                    for mode in ("none", "full", "selective"):
                        blk.activation_checkpoint = mode
                        for defer in (False, True):
                            with torch.set_grad_enabled(grad):
                                blk(x, None, defer)


def test_budget_is_sized_to_the_block_kinds():
    cfg = model_preset("tiny")
    assert recompile_budget(build_mae(cfg)) == 16  # encoder + decoder
    assert recompile_budget(build_classifier(cfg, 3, drop_path_rate=0.1)) == 16  # block 0 drops nothing
    assert recompile_budget(build_classifier(cfg, 3)) == 8


def test_without_compile_there_is_no_scope_and_only_the_checkpoint_mode_is_set():
    model = build_classifier(model_preset("tiny"), 3)
    with compile_scope("wsp", model) as scope:
        assert scope is None
        assert apply_block_options(model, RunConfig(activation_checkpoint="selective"), scope) == 4
    assert all(b.activation_checkpoint == "selective" and b._compiled is None for b in model.blocks)


def test_compile_outside_a_scope_is_refused():
    model = build_classifier(model_preset("tiny"), 3)
    with pytest.raises(ValueError, match="open the stage's compile_scope"):
        apply_block_options(model, RunConfig(compile=True), None)
    assert all(b._compiled is None for b in model.blocks)


def test_the_scope_starts_from_empty_caches_and_restores_the_limit():
    model = build_classifier(model_preset("tiny"), 3)
    default = torch._dynamo.config.recompile_limit
    for _ in range(2):  # the second scope compiles again: the first one's graphs were dropped
        with compile_scope("wsp", model, compile=True, backend="eager") as scope:
            assert torch._dynamo.config.recompile_limit == 8
            apply_block_options(model, RunConfig(compile=True), scope)
            model(torch.randn(2, 1, 28, 28))
            assert scope.graphs == 1 and "1 graph(s) for 4 blocks" in scope.summary()
    assert torch._dynamo.config.recompile_limit == default


def test_unknown_backend_is_one_clear_error(monkeypatch):
    monkeypatch.setenv(BACKEND_ENV, "warp_drive")
    with pytest.raises(ConfigError, match="MAWS_COMPILE_BACKEND='warp_drive' is not a torch.compile backend"):
        compile_backend()
    monkeypatch.delenv(BACKEND_ENV)
    assert compile_backend() == "inductor"
