"""Activation checkpointing and regional compilation of the transformer blocks (``set_block_options``).

Checkpointing must not change a single number: the same loss and every gradient as the plain
model, for MAE (encoder and decoder blocks), WSP (cls token) and the fine-tune model (avg pool,
drop path drawn from a seeded generator: a recomputation multiplies by the same masks), on the
torch path (bit for bit) and the interpreted Triton kernels (whose blocks then add their own MLP
output). Compiling the blocks (inductor on CPU) traces each block's body in one graph, custom ops
included (``fullgraph=True``), shares the graph between blocks of one shape, and matches eager.
The engines (ZeRO-3 regathering for a recomputation, FSDP2, TP) are in tests/parallel/test_engines.py;
saved-activation bytes per mode in tests/test_bench_step.py.
"""
from __future__ import annotations

import copy

import pytest
import torch

from maws_fast.config import model_preset
from maws_fast.models import build_classifier, build_mae
from maws_fast.models.vit import Block, set_block_options

MODES = ("full", "selective")


def _model(task: str, kernels: str = "torch"):
    cfg = model_preset("tiny", kernel_backend=kernels, attn_backend="manual" if kernels == "torch" else "triton")
    if task == "mae":
        return build_mae(cfg, norm_pix_loss=True)
    if task == "wsp":
        return build_classifier(cfg, num_classes=7)
    m = build_classifier(cfg, num_classes=7, global_pool="avg", drop_path_rate=0.3)
    m.set_drop_path_generator(torch.Generator().manual_seed(11))
    return m


def _loss_and_grads(model, x, seed: int):
    """One forward + backward: the loss and every parameter's gradient. The MAE's masking and the
    drop-path generator are re-seeded, so two models see the same masks."""
    model.zero_grad(set_to_none=True)
    model.train()
    torch.manual_seed(seed)
    gen = model.blocks[0].drop_path1.generator
    if gen is not None:
        gen.manual_seed(seed)
    out = model(x)
    loss = out[0] if isinstance(out, tuple) else out.float().square().mean()
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def _assert_close_runs(ref, other, x, seed: int, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    """The same loss and gradients from ``other`` as from ``ref`` (fp32 rounding apart)."""
    loss0, g0 = _loss_and_grads(ref, x, seed)
    loss1, g1 = _loss_and_grads(other, x, seed)
    torch.testing.assert_close(loss1, loss0, rtol=1e-5, atol=1e-6)
    assert set(g1) == set(g0)
    for k in g0:
        torch.testing.assert_close(g1[k], g0[k], rtol=rtol, atol=atol, msg=k)


@pytest.mark.parametrize("mode", MODES)
@pytest.mark.parametrize("task", ["mae", "wsp", "finetune"])
def test_checkpointing_gives_identical_loss_and_gradients(task, mode, seeded):
    plain = _model(task)
    ckpt = copy.deepcopy(plain)
    if task == "finetune":
        ckpt.set_drop_path_generator(torch.Generator())
    assert set_block_options(ckpt, mode) == len([m for m in ckpt.modules() if isinstance(m, Block)]) > 0
    x = torch.randn(5, 1, 28, 28)
    loss0, g0 = _loss_and_grads(plain, x, seeded)
    loss1, g1 = _loss_and_grads(ckpt, x, seeded)
    assert loss1 == loss0
    assert set(g1) == set(g0) and len(g0) > 10
    for k in g0:
        assert torch.equal(g1[k], g0[k]), k
    if task == "finetune":  # the masks dropped something, so the comparison covers drop path
        assert ckpt.blocks[-1].drop_path1.draw(x.new_zeros(64, 1, 1)).eq(0).any()


@pytest.mark.interpreter
@pytest.mark.parametrize("mode", MODES)
def test_checkpointing_the_fused_triton_blocks_matches(mode, seeded):
    """Interpreted Triton kernels: a checkpointed block adds its own MLP output (plain add, then
    LayerNorm) where the plain blocks fuse that add into the next norm; same loss and gradients to
    fp32 rounding."""
    plain = _model("wsp", "triton")
    ckpt = copy.deepcopy(plain)
    set_block_options(ckpt, mode)
    _assert_close_runs(plain, ckpt, torch.randn(3, 1, 28, 28), seeded, atol=1e-6)


def test_checkpointing_recomputes_and_selective_keeps_the_up_projections(seeded):
    """Full checkpointing reruns every block's forward in backward; selective reruns it too but
    takes the qkv and fc1 GEMM outputs from its cache (2 of the block's 4 GEMMs recomputed: proj,
    and fc2 only where its output is needed, which it is not) -- counted by the GEMMs dispatched."""
    from torch.utils._python_dispatch import TorchDispatchMode

    gemms = (torch.ops.aten.mm.default, torch.ops.aten.addmm.default)

    class Count(TorchDispatchMode):
        n = 0

        def __torch_dispatch__(self, func, types, args=(), kwargs=None):
            Count.n += func in gemms
            return func(*args, **(kwargs or {}))

    counts = {}
    for mode in ("none", "full", "selective"):
        model = _model("wsp")
        set_block_options(model, mode)
        Count.n = 0
        with Count():
            _loss_and_grads(model, torch.randn(2, 1, 28, 28), seeded)
        counts[mode] = Count.n
    depth = len(model.blocks)
    # each recomputed GEMM adds one forward GEMM; fc2's is never rerun (backward needs only its input)
    assert counts["full"] - counts["none"] == 3 * depth
    assert counts["selective"] - counts["none"] == 1 * depth


def test_checkpointing_is_off_without_autograd():
    model = _model("wsp")
    set_block_options(model, "full")
    with torch.no_grad():
        out = model(torch.randn(2, 1, 28, 28))
    assert out.grad_fn is None
    model.eval()
    ref = copy.deepcopy(model)
    set_block_options(ref, "none")
    x = torch.randn(2, 1, 28, 28)
    assert torch.equal(model(x), ref(x))


def test_unknown_checkpoint_mode_is_refused():
    with pytest.raises(ValueError, match="activation checkpoint 'some'"):
        set_block_options(_model("wsp"), "some")


@pytest.mark.slow
@pytest.mark.parametrize("mode", ["none", "selective"])
@pytest.mark.parametrize("task", ["mae", "finetune"])
def test_compiled_blocks_match_eager_in_one_graph_each(task, mode, seeded):
    """Inductor on CPU: fullgraph=True per block (a graph break fails), and every block of one
    signature runs the same compiled graph, not one per block."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = _model(task)
    compiled = copy.deepcopy(eager)
    if task == "finetune":
        compiled.set_drop_path_generator(torch.Generator())
    set_block_options(compiled, mode, compile=True)
    torch._dynamo.utils.counters.clear()
    _assert_close_runs(eager, compiled, torch.randn(4, 1, 28, 28), seeded)
    # MAE: encoder and decoder blocks; fine-tune: block 0 (drop rate 0, no masks) and the rest
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] == 2
    assert not torch._dynamo.utils.counters["graph_break"]


@pytest.mark.interpreter
@pytest.mark.slow
def test_compiled_fused_triton_blocks_trace_in_one_graph(seeded):
    """The maws_kernels custom ops (interpreted Triton) inside a compiled block: no graph break."""
    import torch._dynamo

    torch._dynamo.reset()
    eager = _model("wsp", "triton")
    compiled = copy.deepcopy(eager)
    set_block_options(compiled, "none", compile=True)
    torch._dynamo.utils.counters.clear()
    _assert_close_runs(eager, compiled, torch.randn(2, 1, 28, 28), seeded)
    assert not torch._dynamo.utils.counters["graph_break"]
    assert torch._dynamo.utils.counters["stats"]["unique_graphs"] >= 1


@pytest.mark.gpu
@pytest.mark.parametrize("mode", MODES)
def test_gpu_checkpointed_bf16_blocks_match_and_keep_less(mode):
    """On CUDA, the fused Triton blocks in bf16: the same gradients as without checkpointing (to bf16
    rounding: a checkpointed block adds its MLP output itself) and less peak memory."""
    torch.manual_seed(0)
    cfg = model_preset("vit_b16", kernel_backend="triton", attn_backend="triton")
    plain = build_classifier(cfg, num_classes=100).cuda()
    ckpt = copy.deepcopy(plain)
    set_block_options(ckpt, mode)
    x = torch.randn(64, 3, 224, 224, device="cuda")
    peaks, grads = [], []
    for model in (plain, ckpt):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x).float().square().mean()
        loss.backward()
        torch.cuda.synchronize()
        peaks.append(torch.cuda.max_memory_allocated() - base)
        grads.append({n: p.grad.float() for n, p in model.named_parameters()})
    for k in grads[0]:
        torch.testing.assert_close(grads[1][k], grads[0][k], rtol=5e-2, atol=5e-3, msg=k)
    assert peaks[1] < 0.8 * peaks[0], peaks


@pytest.mark.gpu
def test_gpu_compiled_blocks_match_eager():
    import torch._dynamo

    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = model_preset("vit_b16", kernel_backend="triton", attn_backend="triton")
    eager = build_mae(cfg, norm_pix_loss=True).cuda()
    compiled = copy.deepcopy(eager)
    set_block_options(compiled, "selective", compile=True)
    torch._dynamo.utils.counters.clear()
    x = torch.randn(16, 3, 224, 224, device="cuda")
    out = []
    for model in (eager, compiled):
        torch.manual_seed(1)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            loss = model(x)[0]
        loss.backward()
        out.append((loss.detach(), {n: p.grad.float() for n, p in model.named_parameters() if p.grad is not None}))
    torch.testing.assert_close(out[1][0], out[0][0], rtol=2e-2, atol=2e-3)
    for k in out[0][1]:
        torch.testing.assert_close(out[1][1][k], out[0][1][k], rtol=5e-2, atol=5e-3, msg=k)
    assert not torch._dynamo.utils.counters["graph_break"]
