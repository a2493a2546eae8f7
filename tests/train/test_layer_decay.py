"""Layer-wise lr decay groups: the official MAE fine-tune rule (param_groups_lrd), worked by hand
for a 2-block ViT with a head, and every engine honouring lr_scale (the 2-rank parity runs are in
tests/parallel/test_engines.py)."""
import pytest
import torch

from maws_fast.models import VisionTransformer
from maws_fast.train.optim import layer_decay_groups

D = 0.5  # layer_decay; 2 blocks -> 3 layers: embeddings 0, blocks 1 and 2, the rest 3


def _model():
    return VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=5,
                             pos_embed_learnable=True)


def _block(i, kind):
    w = [f"blocks.{i}.{m}.weight" for m in ("attn.qkv", "attn.proj", "mlp.fc1", "mlp.fc2")]
    nd = [f"blocks.{i}.{m}" for m in ("norm1.weight", "norm1.bias", "attn.qkv.bias", "attn.proj.bias",
                                       "norm2.weight", "norm2.bias", "mlp.fc1.bias", "mlp.fc2.bias")]
    return w if kind == "decay" else nd


# By hand: (group name, lr_scale = D ** (3 - layer), weight decay, parameter names)
WANT = [
    ("layer_0_no_decay", D**3, 0.0, ["cls_token", "pos_embed", "patch_embed.proj.bias"]),
    ("layer_0_decay", D**3, 0.05, ["patch_embed.proj.weight"]),
    ("layer_1_no_decay", D**2, 0.0, _block(0, "no_decay")),
    ("layer_1_decay", D**2, 0.05, _block(0, "decay")),
    ("layer_2_no_decay", D**1, 0.0, _block(1, "no_decay")),
    ("layer_2_decay", D**1, 0.05, _block(1, "decay")),
    ("layer_3_no_decay", 1.0, 0.0, ["norm.weight", "norm.bias", "head.bias"]),
    ("layer_3_decay", 1.0, 0.05, ["head.weight"]),
]


def test_groups_follow_the_official_rule_worked_by_hand():
    model = _model()
    names = {id(p): n for n, p in model.named_parameters()}
    got = {g["name"]: (g["lr_scale"], g["weight_decay"], sorted(names[id(p)] for p in g["params"]))
           for g in layer_decay_groups(model, 0.05, D)}
    want = {name: (scale, wd, sorted(params)) for name, scale, wd, params in WANT}
    assert got == want
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(len(g["params"]) for g in layer_decay_groups(model, 0.05, D)) == len(trainable)


def test_frozen_parameters_are_in_no_group():
    model = VisionTransformer(img_size=16, patch_size=8, embed_dim=16, depth=2, num_heads=2, num_classes=5)
    names = {n for g in layer_decay_groups(model, 0.05, D) for n, p in model.named_parameters()
             if any(p is q for q in g["params"])}
    assert "pos_embed" not in names and "cls_token" in names  # the fixed sin-cos table is not trained


@pytest.mark.parametrize("engine", ["ours", "ddp"])
def test_a_one_process_engine_scales_each_groups_lr(engine, seeded):
    """One step at lr with layer decay = torch AdamW with lr * lr_scale per group."""
    from maws_fast.parallel.engine import AdamWSpec, build_engine
    from maws_fast.parallel.mesh import ParallelDims, ParallelLayout, single_process

    class Obj(torch.nn.Module):
        def __init__(self, m):
            super().__init__()
            self.model = m

        def forward(self, x, t, step, micro=0, accum=1):
            return self.model(x).square().mean()

    ref, ours = _model(), _model()
    ours.load_state_dict(ref.state_dict())
    start = ref.blocks[0].attn.qkv.weight.detach().clone()
    x = torch.randn(3, 3, 16, 16)
    groups = layer_decay_groups(ref, 0.05, D)
    opt = torch.optim.AdamW([{**g, "lr": 1e-2 * g["lr_scale"]} for g in groups], lr=1e-2, foreach=False)
    Obj(ref)(x, None, 0).backward()
    opt.step()
    eng = build_engine(Obj(ours), single_process(), ParallelLayout(ParallelDims(1), engine, 0),
                       AdamWSpec.of(ours, layer_decay_groups(ours, 0.05, D)))
    eng.zero_grad()
    eng.backward(eng.objective(x, None, 0))
    eng.step(1e-2)
    for (n, a), b in zip(ours.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=0, atol=2e-7, msg=n)
    # the step moved block 0 (at D**2 = 1/4 of the lr: an engine ignoring lr_scale fails the match above)
    assert not torch.equal(ours.blocks[0].attn.qkv.weight, start)
