"""The Engine protocol and the param groups an engine is handed (one process; the layouts' parity
with one process is tests/parallel/test_engines.py)."""
import pytest
import torch

from maws_fast.parallel.engine import AdamWSpec, DDPEngine, Engine, FSDP2Engine, build_engine, named_groups
from maws_fast.parallel.mesh import ParallelDims, ParallelLayout, single_process
from maws_fast.parallel.zero import ZeroEngine
from tests.parallel.dist_harness import build


def _protocol_members() -> set[str]:
    return {n for n in dir(Engine) if not n.startswith("_")} | set(Engine.__annotations__)


@pytest.mark.parametrize("engine, stage", [("ours", 0), ("ours", 2), ("ours", 3), ("ddp", 0)])
def test_engines_implement_the_protocol(engine, stage):
    model, make, _, _ = build("mae")
    groups = [{"params": list(model.parameters())[:0]}] + [{"params": [p for p in model.parameters() if p.requires_grad]}]
    obj = make(model, 0, 1)
    eng = build_engine(obj, single_process(), ParallelLayout(ParallelDims(1), engine, stage), AdamWSpec.of(model, groups),
                       kernel_backend="torch")
    assert isinstance(eng, Engine) and isinstance(eng, ZeroEngine if engine == "ours" else DDPEngine)
    assert eng.model is model and eng.objective is obj  # one process: DDP wraps nothing
    eng.close()


def test_fsdp2_engine_has_every_member():
    # FSDP2 needs a process group; what the class defines is checked here, its numbers in test_engines.py
    missing = [m for m in _protocol_members() if not hasattr(FSDP2Engine, m) and m not in ("objective", "model")]
    assert not missing


@pytest.mark.parametrize("engine, stage", [("ours", 0), ("ours", 2), ("ours", 3), ("ddp", 0)])
def test_engines_apply_the_param_groups_they_are_given(engine, stage):
    """Three groups with their own weight decay (not MAE's rule): the engine's AdamW equals torch's on them."""
    def groups_of(model):
        trainable = [(n, p) for n, p in model.named_parameters() if p.requires_grad]
        return [{"params": [p for n, p in trainable if n.startswith("blocks.0.")], "weight_decay": 0.3},
                {"params": [p for n, p in trainable if p.ndim == 1 and not n.startswith("blocks.0.")]},  # no decay
                {"params": [p for n, p in trainable if p.ndim > 1 and not n.startswith("blocks.0.")], "weight_decay": 0.1}]

    model, make, imgs, _ = build("mae")
    ref_model, ref_make, _, _ = build("mae")  # the same init (seeded)
    eng = build_engine(make(model, 0, 1), single_process(), ParallelLayout(ParallelDims(1), engine, stage),
                       AdamWSpec.of(model, groups_of(model), betas=(0.9, 0.95)), kernel_backend="torch")
    ref_obj = ref_make(ref_model, 0, 1)
    opt = torch.optim.AdamW(groups_of(ref_model), lr=1e-2, betas=(0.9, 0.95), weight_decay=0.0, foreach=False)
    for step in range(2):
        eng.zero_grad()
        eng.backward(eng.objective(imgs[step], None, step))
        eng.step(1e-2)
        opt.zero_grad()
        ref_obj(imgs[step], None, step).backward()
        opt.step()
    got = eng.full_state_dict()
    ref = {n: p.detach() for n, p in ref_model.named_parameters() if p.requires_grad}
    assert set(got) == set(ref)
    assert max((got[n] - ref[n]).abs().max().item() for n in ref) < 1e-6
    eng.close()


def test_named_groups_refuse_what_an_engine_cannot_train():
    model, _, _, _ = build("wsp")
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match="in no param group"):
        named_groups(model, [{"params": params[1:]}])
    with pytest.raises(ValueError, match="in two param groups"):
        named_groups(model, [{"params": params}, {"params": params[:1]}])
    with pytest.raises(ValueError, match="not a trainable parameter"):
        named_groups(model, [{"params": params + [torch.nn.Parameter(torch.zeros(2))]}])
    (opts, names), = named_groups(model, [{"params": params, "weight_decay": 0.2, "name": "all"}])
    assert opts == {"weight_decay": 0.2, "name": "all"} and names[0] == next(iter(dict(model.named_parameters())))


def test_named_groups_refuse_options_the_engines_would_apply_differently():
    model, _, _, _ = build("wsp")
    params = [p for p in model.parameters() if p.requires_grad]
    with pytest.raises(ValueError, match=r"options \['betas', 'lr'\] are not supported"):
        named_groups(model, [{"params": params, "lr": 1e-3, "betas": (0.9, 0.9)}])
