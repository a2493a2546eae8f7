"""Regional compilation (``run.compile``): dynamo's scope for one training stage or benchmark variant.

:func:`~maws_fast.models.vit.set_block_options` compiles each block's body with
``torch.compile(fullgraph=True)``. Every block of every model shares one code object
(``Block._run``), and dynamo keeps its compiled variants on the code object: one per block
signature it meets (width, drop-path masks present or not, first block of a run or not, grad mode,
checkpoint mode, dtype, shape). Left alone, the variants of MAE, WSP, fine-tune and LiT -- or of
the step benchmark's models and checkpoint modes -- add up in one process until the 9th hits
``torch._dynamo.config.recompile_limit`` (8): under ``fullgraph=True`` a hard error
(FailOnRecompileLimitHit), without it a silent fall back to eager.

:func:`compile_scope` scopes dynamo's caches instead. Where a stage (a new model) starts it
resets them (``torch._dynamo.reset()``: the previous stage's model is gone, its graphs can never run
again), and for the length of the stage it sets the limit to what this model's blocks can
legitimately need (:func:`recompile_budget`), so a runaway recompile -- a guard that changes every
step -- still stops the run, with one line naming the cause. Nothing falls back to eager: fullgraph
stays on and dynamo's ``suppress_errors`` is off inside the scope. Resetting per stage, not raising
one global limit, keeps each stage's compile cost and its failure threshold independent of how
many stages ran before it.

The split of the work: the training loop (and the step benchmark) opens the scope where a stage
starts, before anything is parallelized, and keeps it open until the stage's training ends;
:func:`maws_fast.train.parallelize.parallelize` compiles the blocks inside it
(:meth:`CompileScope.compile_blocks`), after tensor parallelism and before the data-parallel
engine, in torchtitan's order.

The backend is inductor; ``MAWS_COMPILE_BACKEND`` names another registered dynamo backend
(``eager`` / ``aot_eager`` to debug, or a test's counting backend). It is an environment hook, not
a config field: the training result does not depend on it.
"""
from __future__ import annotations

import os
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.nn as nn

from maws_fast.errors import ConfigError, UserError
from maws_fast.models.vit import Block, set_block_options

BACKEND_ENV = "MAWS_COMPILE_BACKEND"
DEFAULT_BACKEND = "inductor"
# Variants one kind of block may need in one stage: x2 the first block of a run (no pending
# branch to add) or a later one, x2 grad on (training) or off (evaluation, LiT's feature cache),
# x2 one automatic-dynamic recompile when a shape first changes (packed caption lengths, a last
# short batch). Checkpoint mode and dtype are fixed for a stage.
VARIANTS_PER_KIND = 8


def compile_backend(name: str | None = None) -> str:
    """The dynamo backend of regional compilation: ``name`` (a benchmark's ``--compile-backend``), else
    ``$MAWS_COMPILE_BACKEND``, else inductor; a name dynamo does not know is one ConfigError."""
    given = name is not None
    name = name if given else (os.environ.get(BACKEND_ENV, "").strip() or DEFAULT_BACKEND)
    known = _dynamo().list_backends(exclude_tags=None)
    if name not in known:
        where = f"--compile-backend {name!r}" if given else f"{BACKEND_ENV}={name!r}"
        raise ConfigError(f"{where} is not a torch.compile backend; choose from {sorted(known)} ({BACKEND_ENV} "
                          "sets the default, inductor when unset)")
    return name


def block_kinds(model: nn.Module) -> set[tuple]:
    """The distinct kinds of :class:`Block` in ``model``: (width, heads, MLP hidden, drops paths)."""
    return {(b.norm1.weight.shape[-1], b.attn.num_heads, b.mlp.fc1.out_features, b.drop_path1.p > 0)
            for b in model.modules() if isinstance(b, Block)}


def recompile_budget(model: nn.Module) -> int:
    """The recompile limit of a stage training ``model``: ``VARIANTS_PER_KIND`` per block kind
    (an MAE: encoder + decoder; a fine-tune: the drop-path-free first block + the rest; a LiT:
    image + text tower), and never below dynamo's own default."""
    return max(int(_dynamo().config.recompile_limit), VARIANTS_PER_KIND * len(block_kinds(model)))


@dataclass
class CompileScope:
    """One stage's (or variant's) compile scope; ``graphs`` counts dynamo graphs made since it opened.

    Attributes:
        name: the stage (or variant) for messages.
        backend: what ``torch.compile`` gets (a backend name or a callable).
        label: the backend's name for the summary line.
        limit: dynamo's recompile limit inside the scope.
        start_graphs: dynamo's graph count when the scope opened.
        blocks: blocks compiled in it (:meth:`compile_blocks`).
    """

    name: str
    backend: str | Callable
    label: str
    limit: int
    start_graphs: int
    blocks: int = 0

    @property
    def graphs(self) -> int:
        return _graphs_so_far() - self.start_graphs

    def compile_blocks(self, model: nn.Module, activation_checkpoint: str = "none") -> int:
        """:func:`set_block_options` with compile on, under this scope's backend; returns the blocks set."""
        n = set_block_options(model, activation_checkpoint, compile=True, backend=self.backend)
        self.blocks += n
        return n

    def summary(self) -> str:
        return (f"[{self.name}] regional compile ({self.label}): {self.graphs} graph(s) for {self.blocks} blocks "
                f"(recompile limit {self.limit} for this stage)")


def _dynamo():
    """torch._dynamo, imported on first use: a run without compile never pays for the import."""
    import torch._dynamo as dynamo

    return dynamo


def compile_counts() -> tuple[int, int]:
    """(graphs dynamo has handed to a backend, graph breaks it has met) in this process so far: dynamo's
    own tallies, which torch._dynamo.reset() leaves alone."""
    counters = _dynamo().utils.counters
    return int(counters["stats"]["unique_graphs"]), sum(counters["graph_break"].values())


def _graphs_so_far() -> int:
    return compile_counts()[0]


def _one_line(e: BaseException) -> str:
    """The first non-empty line of ``e`` or of what it was raised from (dynamo wraps the real error)."""
    for err in (e, e.__cause__, e.__context__):
        text = str(err or "").strip()
        if text:
            return f"{type(err).__name__}: {text.splitlines()[0][:300]}"
    return type(e).__name__


def _last_recompile_reason() -> str:
    """Dynamo's last guard failure on the block body, when this torch keeps it (a hint, may be '')."""
    failures = getattr(_dynamo().utils, "guard_failures", {}).get(Block._run.__code__) or []
    return f"; last cause: {str(failures[-1]).strip().splitlines()[0][:200]}" if failures else ""


@contextmanager
def compile_scope(name: str, model: nn.Module, compile: bool = False,
                  backend: str | Callable | None = None) -> Iterator[CompileScope | None]:
    """Dynamo's caches, recompile limit and errors scoped to one stage or benchmark variant.

    Without ``compile`` it does nothing and yields None. With it: dynamo's caches are reset, the
    recompile limit is :func:`recompile_budget` of ``model`` until the scope closes, and a compile
    failure inside it is one :class:`~maws_fast.errors.UserError` naming the cause. Open it before
    :func:`maws_fast.train.parallelize.parallelize` (which compiles the blocks in it, given the
    scope) and keep it open for the whole of the training.

    Args:
        name: the stage (or variant) for messages.
        model: the network whose blocks will be compiled (its block kinds size the limit; tensor
            parallelism, applied later, splits every block alike and leaves the kinds as they are).
        compile: ``run.compile``.
        backend: dynamo backend; None = :func:`compile_backend`.
    """
    if not compile:
        yield None
        return
    dynamo = _dynamo()
    if not dynamo.is_dynamo_supported():
        raise UserError(f"[{name}] run.compile=true, but torch.compile does not run on this Python / platform "
                        f"(torch {torch.__version__}); set --run.compile=false")
    backend = backend if backend is not None else compile_backend()
    label = backend if isinstance(backend, str) else getattr(backend, "__name__", type(backend).__name__)
    dynamo.reset()  # a new model: the previous stage's graphs can never run again
    limit = recompile_budget(model)
    kinds = len(block_kinds(model))
    with dynamo.config.patch(recompile_limit=limit, suppress_errors=False):
        scope = CompileScope(name, backend, label, limit, _graphs_so_far())
        try:
            yield scope
        except dynamo.exc.FailOnRecompileLimitHit as e:
            raise UserError(f"[{name}] run.compile: the block bodies needed more than {limit} compiled variants "
                            f"(the recompile limit sized for this model's {kinds} block kind(s))"
                            f"{_last_recompile_reason()}. This is a bug to report; meanwhile set --run.compile=false "
                            "(TORCH_LOGS=recompiles lists every cause)") from e
        except dynamo.exc.BackendCompilerFailed as e:
            raise UserError(f"[{name}] run.compile: torch.compile's {label} backend failed on a block body "
                            f"({_one_line(getattr(e, 'inner_exception', None) or e)}); set "
                            "--run.compile=false, or fix what it names") from e
