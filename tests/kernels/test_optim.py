"""maws_kernels.optim.FusedAdamW against torch.optim.AdamW, the optimizer it replaces.

Step for step on a small network with two param groups (weight decay / none, one with an
``lr_scale``), params that miss a grad on some steps, bf16 grads; the state_dict in both
directions (a run saved by one resumes in the other and continues exactly as an uninterrupted
one); LR schedulers; the errors. The "torch" backend is held bit-exact, the Triton kernel (under
the interpreter here) to ~1e-6 relative (tests/kernels/test_adamw.py's rule).
"""
import copy
import io
import math

import pytest
import torch
from torch import nn

from maws_kernels.adamw import fused_adamw_multi_, fused_adamw_ref
from maws_kernels.optim import FusedAdamW

# The CPU tests here run Triton on CPU tensors (interpreted); the gpu-marked ones run compiled kernels.
pytestmark = pytest.mark.interpreter

BACKENDS = ("triton", "torch")
RTOL = 2e-6


def _net() -> nn.Module:
    return nn.Sequential(nn.Linear(13, 37), nn.LayerNorm(37), nn.GELU(), nn.Linear(37, 5))


def _groups(net: nn.Module, lr_scale: float = 0.5) -> list[dict]:
    decay = [p for p in net.parameters() if p.dim() >= 2]
    no_decay = [p for p in net.parameters() if p.dim() < 2]
    return [{"params": decay, "weight_decay": 0.05}, {"params": no_decay, "weight_decay": 0.0, "lr_scale": lr_scale}]


def _lr(step: int) -> float:
    return 2e-3 * min(1.0, step / 3) * (0.5 + 0.5 * math.cos(step / 7))


def _set_lr(opt, lr: float) -> None:  # what an LR schedule with lr_scale does (timm's, maws_fast's)
    for g in opt.param_groups:
        g["lr"] = lr * g.get("lr_scale", 1.0)


def _backward(net: nn.Module, step: int, skip_bias: bool = False, dtype=None) -> None:
    net.zero_grad(set_to_none=True)
    gen = torch.Generator().manual_seed(1000 + step)
    x = torch.randn(8, 13, generator=gen)
    (net(x).square().mean() * 10.0 ** (step % 4 - 2)).backward()
    if skip_bias and step % 3 == 0:
        net[3].bias.grad = None  # a param without a grad this step: left alone, its step count lags
    if dtype is not None:
        for p in net.parameters():
            if p.grad is not None:
                p.grad_dtype = None  # torch >= 2.13 holds a grad to its param's dtype unless told otherwise
                p.grad = p.grad.to(dtype)


def _assert_close(ours: nn.Module, theirs: nn.Module, exact: bool, what: str) -> None:
    for (n, a), b in zip(ours.named_parameters(), theirs.parameters()):
        if exact:
            assert torch.equal(a, b), f"{what}: {n} differs by {(a - b).abs().max().item():.3g}"
        else:
            err = (a - b).abs().max().item()
            assert err <= RTOL * (b.abs().max().item() + 1e-2), f"{what}: {n} off by {err:.3g}"


def _pair(backend, **kw):
    ours_net = _net()
    torch_net = copy.deepcopy(ours_net)
    ours = FusedAdamW(_groups(ours_net), lr=1.0, backend=backend, **kw)
    theirs = torch.optim.AdamW(_groups(torch_net), lr=1.0, foreach=False, fused=False, **kw)
    return ours_net, ours, torch_net, theirs


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("skip_bias", [False, True])
def test_matches_torch_adamw(seeded, backend, skip_bias):
    ours_net, ours, torch_net, theirs = _pair(backend, betas=(0.9, 0.95), eps=1e-8)
    for step in range(1, 11):
        for net in (ours_net, torch_net):
            _backward(net, step, skip_bias)
        ours.set_lr(_lr(step))
        _set_lr(theirs, _lr(step))
        ours.step()
        theirs.step()
        _assert_close(ours_net, torch_net, exact=backend == "torch", what=f"step {step}")
    bias = ours_net[3].bias
    assert int(ours.state[bias]["step"]) == (7 if skip_bias else 10)
    for p, q in zip(ours_net.parameters(), torch_net.parameters()):
        for key in ("exp_avg", "exp_avg_sq"):
            a, b = ours.state[p][key], theirs.state[q][key]
            if backend == "torch":
                assert torch.equal(a, b), key
            else:  # exp_avg cancels towards 0 in places: error relative to the tensor's magnitude
                assert (a - b).abs().max() <= 1e-5 * b.abs().max() + 1e-30, key


def test_moments_are_views_of_one_flat_buffer_per_group():
    net = _net()
    opt = FusedAdamW(_groups(net), backend="torch")
    _backward(net, 1)
    opt.step()
    for group in opt.param_groups:
        bases = {opt.state[p]["exp_avg"].untyped_storage().data_ptr() for p in group["params"]}
        assert len(bases) == 1
        sizes = sum(-(-p.numel() // 4) * 4 for p in group["params"])  # each view padded to 16 bytes
        assert opt.state[group["params"][0]]["exp_avg"].untyped_storage().nbytes() == 4 * sizes
        assert all(opt.state[p][k].data_ptr() % 16 == 0 for p in group["params"] for k in ("exp_avg", "exp_avg_sq"))


@pytest.mark.parametrize("grad_dtype", [torch.bfloat16, torch.float16])
@pytest.mark.skipif(not hasattr(torch.Tensor, "grad_dtype"), reason="this torch cannot hold a grad of another dtype")
def test_low_precision_grads(seeded, grad_dtype):
    """bf16 / fp16 grads: the kernel upcasts them, as the torch path does (fp32 grads of the same values)."""
    ours_net, ours, torch_net, theirs = _pair("triton")
    for step in range(1, 5):
        _backward(ours_net, step, dtype=grad_dtype)
        _backward(torch_net, step, dtype=grad_dtype)
        for p in torch_net.parameters():
            p.grad = p.grad.float()
        ours.set_lr(_lr(step))
        _set_lr(theirs, _lr(step))
        ours.step()
        theirs.step()
    _assert_close(ours_net, torch_net, exact=False, what=str(grad_dtype))


def _roundtrip(state: dict) -> dict:
    buf = io.BytesIO()
    torch.save(state, buf)
    buf.seek(0)
    return torch.load(buf, weights_only=True)


@pytest.mark.parametrize("direction", ["ours_to_torch", "torch_to_ours"])
def test_state_dict_resumes_in_the_other(seeded, direction):
    """Five steps in one optimizer, saved (through torch.save), loaded into the other, five more steps:
    the same weights as ten uninterrupted steps of torch's AdamW."""
    ref_net = _net()
    net = copy.deepcopy(ref_net)
    ref = torch.optim.AdamW(_groups(ref_net), lr=1.0, foreach=False, fused=False)
    first_cls, second_cls = (FusedAdamW, torch.optim.AdamW) if direction == "ours_to_torch" else \
        (torch.optim.AdamW, FusedAdamW)
    kw = lambda cls: {"backend": "torch"} if cls is FusedAdamW else {"foreach": False, "fused": False}  # noqa: E731
    opt = first_cls(_groups(net), lr=1.0, **kw(first_cls))
    for step in range(1, 11):
        if step == 6:
            saved = _roundtrip(opt.state_dict())
            if first_cls is FusedAdamW:
                assert all(g["decoupled_weight_decay"] and g["lr_scale"] in (1.0, 0.5) for g in saved["param_groups"])
                assert set(saved["state"][0]) == {"step", "exp_avg", "exp_avg_sq"}
                assert saved["state"][0]["step"].dtype == torch.float32 and saved["state"][0]["step"].dim() == 0
            net2 = copy.deepcopy(net)
            opt = second_cls(_groups(net2), lr=1.0, **kw(second_cls))
            opt.load_state_dict(saved)
            net = net2
        for n in (net, ref_net):
            _backward(n, step)
        _set_lr(opt, _lr(step))
        _set_lr(ref, _lr(step))
        opt.step()
        ref.step()
    _assert_close(net, ref_net, exact=True, what=direction)
    assert all(g.get("lr_scale", 1.0) == s for g, s in zip(opt.param_groups, (1.0, 0.5)))


def test_works_with_torch_lr_schedulers():
    ours_net, ours, torch_net, theirs = _pair("torch")
    sched = [torch.optim.lr_scheduler.LambdaLR(o, lambda s: 0.5 ** s) for o in (ours, theirs)]
    for step in range(1, 6):
        for n in (ours_net, torch_net):
            _backward(n, step)
        ours.step()
        theirs.step()
        for s in sched:
            s.step()
    _assert_close(ours_net, torch_net, exact=True, what="LambdaLR")
    assert [g["lr"] for g in ours.param_groups] == [g["lr"] for g in theirs.param_groups]


def test_step_with_closure_and_no_grads():
    net = _net()
    opt = FusedAdamW(net.parameters(), backend="torch")
    before = [p.detach().clone() for p in net.parameters()]
    opt.step()  # no grads at all: nothing moves
    assert all(torch.equal(a, b) for a, b in zip(before, net.parameters()))

    def closure():
        opt.zero_grad()
        loss = net(torch.randn(4, 13)).sum()
        loss.backward()
        return loss

    assert opt.step(closure) is not None
    assert not all(torch.equal(a, b) for a, b in zip(before, net.parameters()))


@pytest.mark.parametrize("backend", BACKENDS)
def test_channels_last_and_frozen_params(seeded, backend):
    """A channels-last conv (timm's --channels-last) steps as torch's AdamW does, and a frozen param
    (in the group, never a grad) gets no state: the state_dicts hold the same entries."""
    def net():
        torch.manual_seed(5)
        m = nn.Sequential(nn.Conv2d(3, 8, 3), nn.Flatten(), nn.Linear(8 * 6 * 6, 4), nn.Linear(4, 4))
        m[3].requires_grad_(False)
        return m.to(memory_format=torch.channels_last)
    ours_net, torch_net = net(), net()
    assert ours_net[0].weight.is_contiguous(memory_format=torch.channels_last)
    ours = FusedAdamW(ours_net.parameters(), lr=1e-2, backend=backend)
    theirs = torch.optim.AdamW(torch_net.parameters(), lr=1e-2, foreach=False)
    x = torch.randn(2, 3, 8, 8).to(memory_format=torch.channels_last)
    for _ in range(3):
        for n, o in ((ours_net, ours), (torch_net, theirs)):
            o.zero_grad()
            n(x).square().sum().backward()
            o.step()
    _assert_close(ours_net, torch_net, exact=backend == "torch", what="channels-last")
    assert ours.state[ours_net[0].weight]["exp_avg"].is_contiguous(memory_format=torch.channels_last)
    assert sorted(ours.state_dict()["state"]) == sorted(theirs.state_dict()["state"]) == [0, 1, 2, 3]


def test_copy_pickle_and_load_before_step(seeded):
    import pickle

    net = _net()
    opt = FusedAdamW(_groups(net), lr=1e-2, backend="torch")
    _backward(net, 1)
    opt.step()
    for other in (copy.deepcopy(opt), pickle.loads(pickle.dumps(opt))):
        assert other.backend == "torch"
        for g in other.param_groups:
            for p in g["params"]:
                p.grad = torch.ones_like(p)
        other.step()  # works on the copy (its own parameters)
    fresh = FusedAdamW(_groups(net), lr=1e-2, backend="torch")
    fresh.load_state_dict(opt.state_dict())
    for a, b in zip(fresh.state_dict()["state"].values(), opt.state_dict()["state"].values()):
        assert all(torch.equal(a[k], b[k]) for k in ("step", "exp_avg", "exp_avg_sq"))


def test_constructor_is_torchs():
    params = list(nn.Linear(3, 3).parameters())
    FusedAdamW(params, 1e-3, (0.9, 0.95), 1e-8, 0.05, False, foreach=False, fused=None)  # torch's positional order
    with pytest.raises(ValueError, match="capturable"):
        FusedAdamW(params, capturable=True)
    opt = FusedAdamW([params[0]])
    with pytest.raises(ValueError, match="fp32"):
        opt.add_param_group({"params": [nn.Parameter(torch.zeros(2, dtype=torch.bfloat16))]})
    assert len(opt.param_groups) == 1  # the refused group is not kept


def test_errors():
    with pytest.raises(ValueError, match="fp32"):
        FusedAdamW(nn.Linear(3, 3).bfloat16().parameters())
    with pytest.raises(ValueError, match="amsgrad"):
        FusedAdamW(nn.Linear(3, 3).parameters(), amsgrad=True)
    with pytest.raises(ValueError, match="backend"):
        FusedAdamW(nn.Linear(3, 3).parameters(), backend="cuda-ish")
    adam = torch.optim.Adam(nn.Linear(3, 3).parameters())  # L2 decay, not AdamW
    with pytest.raises(ValueError, match="decoupled_weight_decay"):
        FusedAdamW(nn.Linear(3, 3).parameters()).load_state_dict(adam.state_dict())
    emb = nn.Embedding(10, 4, sparse=True)
    opt = FusedAdamW(emb.parameters(), backend="torch")
    emb(torch.tensor([1, 2])).sum().backward()
    with pytest.raises(ValueError, match="sparse"):
        opt.step()


def test_multi_kernel_against_reference(seeded):
    """The multi-tensor kernel on awkward sizes (empty, 1, ragged across chunks) and shapes."""
    shapes = [(3, 5), (4099,), (1,), (0,), (64, 33), (2, 3, 7)]
    ps = [torch.randn(s) for s in shapes]
    gs = [torch.randn(s) for s in shapes]
    ms = [0.1 * torch.randn(s) for s in shapes]
    vs = [1e-3 * torch.rand(s) for s in shapes]
    ref = [[t.clone() for t in ts] for ts in (ps, ms, vs)]
    fused_adamw_multi_(ps, gs, ms, vs, step=4, lr=1e-2, beta1=0.9, beta2=0.95, weight_decay=0.05, backend="triton")
    for i in range(len(shapes)):
        fused_adamw_ref(ref[0][i].view(-1), gs[i].view(-1), ref[1][i].view(-1), ref[2][i].view(-1), step=4, lr=1e-2,
                        beta1=0.9, beta2=0.95, weight_decay=0.05)
    for a, b in zip(ps + ms + vs, ref[0] + ref[1] + ref[2]):
        if b.numel():  # exp_avg cancels towards 0: error relative to the tensor's scale
            assert torch.allclose(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())


def test_multi_kernel_unaligned_views(seeded):
    """Views at odd offsets (not 16-byte aligned: the kernel's scalar path) and full chunks (vector path)."""
    base = [torch.randn(20001) for _ in range(4)]
    before = [b.clone() for b in base]
    ps, gs, ms, vs = ([b[1:8193]] for b in base)  # 8192 elements from offset 1: two full interpreter chunks
    ref = [t.clone() for t in (ps[0], ms[0], vs[0])]
    vs[0].abs_()
    ref[2].abs_()
    fused_adamw_multi_(ps, gs, ms, vs, step=2, lr=1e-2, weight_decay=0.05, backend="triton")
    fused_adamw_ref(ref[0], gs[0].clone(), ref[1], ref[2], step=2, lr=1e-2, weight_decay=0.05)
    for a, b in zip((ps[0], ms[0], vs[0]), ref):  # exp_avg cancels towards 0: error relative to its scale
        assert torch.allclose(a, b, rtol=1e-6, atol=1e-6 * b.abs().max().item())
    for b, b0 in zip(base, before):  # nothing outside the views written
        assert torch.equal(b[:1], b0[:1]) and torch.equal(b[8193:], b0[8193:])


def test_multi_rejects_bad_lists():
    p = torch.zeros(3)
    with pytest.raises(ValueError, match="one of each"):
        fused_adamw_multi_([p], [], [p], [p], step=1, lr=1e-3)
    with pytest.raises(ValueError, match="contiguous"):
        fused_adamw_multi_([torch.zeros(4, 4).t()], [torch.zeros(4, 4)], [torch.zeros(4, 4)], [torch.zeros(4, 4)],
                           step=1, lr=1e-3)
    with pytest.raises(ValueError, match="same for every"):
        fused_adamw_multi_([p, p.clone()], [p, p.bfloat16()], [p, p], [p, p], step=1, lr=1e-3)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_matches_torch_adamw_on_gpu(seeded):
    net = _net().cuda()
    ref_net = copy.deepcopy(net)
    ours = FusedAdamW(_groups(net), lr=1.0, backend="triton")
    theirs = torch.optim.AdamW(_groups(ref_net), lr=1.0, foreach=False)
    for step in range(1, 11):
        for n in (net, ref_net):
            n.zero_grad()
            (n(torch.randn(8, 13, device="cuda", generator=torch.Generator("cuda").manual_seed(step))).square()
             .mean()).backward()
        ours.set_lr(_lr(step))
        _set_lr(theirs, _lr(step))
        ours.step()
        theirs.step()
    _assert_close(net, ref_net, exact=False, what="gpu")


def test_alignment_flag_is_computed_from_the_addresses(monkeypatch):
    import maws_kernels.adamw as adamw

    seen = []
    real = adamw._adamw_multi_launch_tables
    monkeypatch.setattr(adamw, "_adamw_multi_launch_tables", lambda *a: (seen.append(a[-1]), real(*a)))
    fresh = [torch.randn(100) for _ in range(4)]
    fused_adamw_multi_([fresh[0]], [fresh[1]], [fresh[2]], [fresh[3].abs()], step=1, lr=1e-3, backend="triton")
    offset = [torch.randn(101)[1:] for _ in range(4)]  # 4 bytes past the allocation's start
    fused_adamw_multi_([offset[0]], [offset[1]], [offset[2]], [offset[3].abs_()], step=1, lr=1e-3, backend="triton")
    assert seen == [True, False]
