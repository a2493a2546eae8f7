"""maws_kernels.nn: each module against the torch (or timm) module it replaces.

Same parameters and state_dict keys; outputs and every gradient equal on the "torch" backend and
within fp32 rounding on the Triton kernels (the interpreter here, tiny awkward shapes).
"""
import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import maws_kernels
from maws_kernels import nn as mnn

# The CPU tests here run Triton on CPU tensors (interpreted); the gpu-marked ones run compiled kernels.
pytestmark = pytest.mark.interpreter

KERNEL_BACKENDS = ("torch", "triton")
TOL = dict(rtol=1e-5, atol=1e-5)


def _run(module, *inputs):
    """(outputs, grads of inputs, grads of parameters) of one forward + backward with a random cotangent."""
    leaves = [x.detach().clone().requires_grad_(x.is_floating_point()) for x in inputs]
    out = module(*leaves)
    outs = out if isinstance(out, tuple) else (out,)
    gen = torch.Generator().manual_seed(7)
    loss = sum((o.float() * torch.randn(o.shape, generator=gen)).sum() for o in outs)
    loss.backward()
    return ([o.detach() for o in outs], [x.grad for x in leaves if x.requires_grad],
            {n: p.grad.clone() for n, p in module.named_parameters()})


def _assert_same(a, b, exact: bool) -> None:
    (oa, ga, pa), (ob, gb, pb) = a, b
    assert pa.keys() == pb.keys() and len(oa) == len(ob) and len(ga) == len(gb)
    pairs = list(zip(oa, ob)) + list(zip(ga, gb)) + [(pa[k], pb[k]) for k in pa]
    for x, y in pairs:
        assert (torch.equal(x, y) if exact else torch.allclose(x, y, **TOL)), (x - y).abs().max()


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
@pytest.mark.parametrize("shape", [(3, 7, 40), (1, 5)])
def test_layer_norm_is_nn_layer_norm(seeded, backend, shape):
    ref = nn.LayerNorm(shape[-1], eps=1e-6)
    with torch.no_grad():
        ref.weight.normal_()
        ref.bias.normal_()
    ours = mnn.LayerNorm(shape[-1], eps=1e-6, backend=backend)
    ours.load_state_dict(ref.state_dict())
    assert isinstance(ours, nn.LayerNorm) and list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(shape)
    _assert_same(_run(ours, x), _run(ref, x), exact=False)


def test_layer_norm_from_module_shares_parameters():
    ref = nn.LayerNorm(8)
    ours = mnn.LayerNorm.from_module(ref)
    assert ours.weight is ref.weight and ours.bias is ref.bias and ours.eps == ref.eps
    no_affine = mnn.LayerNorm.from_module(nn.LayerNorm(8, elementwise_affine=False))
    assert no_affine.weight is None and list(no_affine.state_dict()) == []
    x = torch.randn(2, 8)
    assert torch.allclose(no_affine(x), F.layer_norm(x, (8,)), atol=1e-6)


class _AddThenNorm(nn.Module):
    """The unfused reference: s = residual + x (+ x_bias), then ``norm(s)``; returns (norm(s), s)."""

    def __init__(self, norm: nn.LayerNorm):
        super().__init__()
        self.norm = norm

    def forward(self, x, r, xb=None):
        s = r + x if xb is None else r + x + xb
        return self.norm(s), s


def _random_affine(module: nn.Module) -> tuple[nn.Module, nn.LayerNorm]:
    """``module`` with random affine parameters, and torch's LayerNorm holding the same ones."""
    with torch.no_grad():
        module.weight.normal_()
        module.bias.normal_()
    ref = nn.LayerNorm(24, eps=1e-6)
    ref.load_state_dict(module.state_dict())
    return module, ref


def _against_unfused(ours: nn.Module, ref: nn.LayerNorm, *args):
    a, b = _run(ours, *args), _run(_AddThenNorm(ref), *args)
    b = (b[0], b[1], {k.removeprefix("norm."): v for k, v in b[2].items()})
    _assert_same(a, b, exact=False)
    return a


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_add_layer_norm(seeded, backend):
    ours, ref = _random_affine(mnn.AddLayerNorm(24, eps=1e-6, backend=backend))
    x, r = torch.randn(5, 3, 24), torch.randn(5, 3, 24)
    _against_unfused(ours, ref, x, r)
    y, s = ours(x)  # residual=None: the first block of a stack
    assert torch.equal(s, x) and torch.allclose(y, ref(x), **TOL)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_layer_norm_with_a_residual_is_the_fused_add(seeded, backend):
    """``LayerNorm(x, residual, x_bias)``: the pair (norm(s), s), s = residual + x + x_bias, against
    torch's adds then nn.LayerNorm; the same numbers as AddLayerNorm's; ``add_backend`` says fused
    or not."""
    ours, ref = _random_affine(mnn.LayerNorm(24, eps=1e-6, backend=backend))
    x, r, xb = torch.randn(5, 3, 24), torch.randn(5, 3, 24), torch.randn(24)
    a = _against_unfused(ours, ref, x, r, xb)
    add = mnn.AddLayerNorm(24, eps=1e-6, backend=backend)
    add.load_state_dict(ours.state_dict())
    _assert_same(_run(add, x, r, xb), a, exact=True)
    assert ours.add_backend(x) == (None if backend == "torch" else "triton")
    # a per-call backend overrides the module's: the fused kernel against the torch one
    other = mnn.LayerNorm(24, eps=1e-6, backend="torch")
    other.load_state_dict(ours.state_dict())
    y, s = other.forward_add(x, r, xb, backend=backend)
    assert torch.allclose(y, a[0][0], **TOL) and torch.allclose(s, a[0][1], **TOL)


def test_layer_norm_over_two_dims_adds_with_torch():
    ours = mnn.LayerNorm((3, 8), backend="triton")
    x, r = torch.randn(2, 3, 8), torch.randn(2, 3, 8)
    assert ours.add_backend(x) is None  # not a fused kernel: callers keep their own add
    y, s = ours(x, r)
    assert torch.equal(s, r + x) and torch.equal(y, F.layer_norm(r + x, (3, 8), ours.weight, ours.bias, ours.eps))


def test_linear_without_bias():
    lin = nn.Linear(6, 4)
    x = torch.randn(3, 6)
    y, b = mnn.linear_without_bias(lin, x)
    assert b is lin.bias and torch.equal(y, F.linear(x, lin.weight))

    class Split(nn.Linear):  # a layer that knows how to leave its bias out (a tensor-parallel one)
        def forward_without_bias(self, x):
            return F.linear(x, 2 * self.weight), self.bias

    split = Split(6, 4)
    y, b = mnn.linear_without_bias(split, x)
    assert b is split.bias and torch.equal(y, F.linear(x, 2 * split.weight))
    seq = nn.Sequential(nn.Linear(6, 4))  # anything else runs whole
    y, b = mnn.linear_without_bias(seq, x)
    assert b is None and torch.equal(y, seq(x))


class _TimmLikeAttention(nn.Module):
    """timm's Attention arithmetic (qkv -> (3, B, H, N, Dh) -> SDPA -> proj), written out."""

    def __init__(self, dim, heads):
        super().__init__()
        self.num_heads, self.head_dim = heads, dim // heads
        self.qkv, self.proj = nn.Linear(dim, 3 * dim), nn.Linear(dim, dim)

    def forward(self, x):
        B, N, C = x.shape
        q, k, v = self.qkv(x).reshape(B, N, 3, self.num_heads, self.head_dim).permute(2, 0, 3, 1, 4).unbind(0)
        return self.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(B, N, C))


@pytest.mark.parametrize("backend", ["sdpa", "manual", "triton"])
def test_attention(seeded, backend):
    ref = _TimmLikeAttention(48, 3)
    ours = mnn.Attention(48, 3, backend=backend)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(2, 13, 48)
    _assert_same(_run(ours, x), _run(ref, x), exact=backend == "sdpa")


@pytest.mark.parametrize("backend", ["sdpa", "manual", "triton"])
def test_attention_on_packed_sequences_is_each_sequence_alone(seeded, backend):
    """``seq=Packed(cu_seqlens, max_seqlen)``: sequences packed into one (1, T, D) stream attend each
    within itself; output and every gradient equal the same module on each sequence alone."""
    attn = mnn.Attention(32, 4, backend=backend)
    lengths = [1, 7, 20, 4]
    x = torch.randn(1, sum(lengths), 32)
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)

    class EachAlone(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = copy.deepcopy(attn)  # its own gradients

        def forward(self, x):
            return torch.cat([self.attn(part) for part in x.split(lengths, dim=1)], dim=1)

    class PackedRun(nn.Module):
        def __init__(self):
            super().__init__()
            self.attn = attn

        def forward(self, x):
            return self.attn(x, seq=mnn.Packed(cu, max(lengths) + 3))

    _assert_same(_run(PackedRun(), x), _run(EachAlone(), x), exact=False)
    with pytest.raises(ValueError, match="one \\(1, T, D\\) stream"):
        attn(torch.randn(2, 4, 32), seq=mnn.Packed(cu, 20))


@pytest.mark.parametrize("seq", [False, True])
def test_attention_without_its_output_bias(seeded, seq):
    attn = mnn.Attention(32, 4, backend="sdpa")
    x = torch.randn(1, 9, 32)
    packed = mnn.Packed(torch.tensor([0, 4, 9], dtype=torch.int32), 5) if seq else None
    y, b = attn.forward_without_bias(x, seq=packed)
    assert b is attn.proj.bias
    assert torch.allclose(y + b, attn(x, seq=packed), **TOL)


def test_attention_refuses_masks_and_unknown_backends():
    attn = mnn.Attention(16, 2)
    with pytest.raises(ValueError, match="attn_mask"):
        attn(torch.randn(1, 4, 16), attn_mask=torch.ones(4, 4, dtype=torch.bool))
    with pytest.raises(ValueError, match="attention backend"):
        mnn.Attention(16, 2, backend="flash")
    with pytest.raises(ValueError, match="divisible"):
        mnn.Attention(15, 2)


def test_default_attention_backend_on_cpu_is_sdpa():
    assert mnn.default_attention_backend("cpu") == "sdpa"


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_mlp(seeded, backend):
    ref = nn.Sequential()
    ref.fc1, ref.act, ref.fc2 = nn.Linear(20, 52), nn.GELU(), nn.Linear(52, 20)
    ours = mnn.Mlp(20, 52, backend=backend)
    ours.load_state_dict(ref.state_dict())
    assert list(ours.state_dict()) == list(ref.state_dict())
    x = torch.randn(3, 7, 20)
    _assert_same(_run(ours, x), _run(ref, x), exact=backend == "torch")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_mlp_fuses_through_an_fc1_that_leaves_its_bias_out(seeded, backend):
    """An fc1 with ``forward_without_bias`` (a tensor-parallel layer) keeps the fused bias-GELU;
    an fc1 without a bias runs torch's GELU; both equal the unfused Mlp."""
    calls = []

    class Split(nn.Linear):
        def forward_without_bias(self, x):
            calls.append("without_bias")
            return F.linear(x, self.weight), self.bias

    ref = nn.Sequential()
    ref.fc1, ref.act, ref.fc2 = nn.Linear(20, 52), nn.GELU(), nn.Linear(52, 20)
    ours = mnn.Mlp(20, 52, backend=backend)
    ours.fc1 = Split(20, 52)
    ours.load_state_dict(ref.state_dict())
    x = torch.randn(3, 7, 20)
    _assert_same(_run(ours, x), _run(ref, x), exact=backend == "torch")
    assert calls == ([] if backend == "torch" else ["without_bias"])
    ref.fc1, ours.fc1 = nn.Linear(20, 52, bias=False), nn.Linear(20, 52, bias=False)
    ours.load_state_dict(ref.state_dict())
    ours.zero_grad()
    ref.zero_grad()
    _assert_same(_run(ours, x), _run(ref, x), exact=True)


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_soft_target_cross_entropy(seeded, backend):
    logits = torch.randn(6, 37, requires_grad=True)
    targets = torch.softmax(torch.randn(6, 37), -1)
    loss = mnn.SoftTargetCrossEntropy(backend=backend)(logits, targets)
    ref = (-targets * F.log_softmax(logits, -1)).sum(-1).mean()  # timm's SoftTargetCrossEntropy
    g, = torch.autograd.grad(loss, logits)
    gr, = torch.autograd.grad(ref, logits)
    assert torch.allclose(loss, ref, **TOL) and torch.allclose(g, gr, **TOL)
    ids = torch.tensor([[1, 5, -1]] * 6)
    wts = torch.tensor([[0.5, 0.5, 0.0]] * 6)
    sparse = mnn.SoftTargetCrossEntropy(backend=backend)(logits, target_ids=ids, target_weights=wts)
    dense = maws_kernels.sparse_to_dense(ids, wts, 37)
    assert torch.allclose(sparse, (-dense * F.log_softmax(logits, -1)).sum(-1).mean(), **TOL)
    with pytest.raises(ValueError, match="reduction"):
        mnn.SoftTargetCrossEntropy(reduction="avg")


@pytest.mark.parametrize("backend", KERNEL_BACKENDS)
def test_norm_pix_loss(seeded, backend):
    """Against the official MAE formula: patchify, per-patch mean / unbiased var, MSE, mean over removed."""
    p = 4
    images = torch.randn(2, 3, 12, 16)
    pred = torch.randn(2, 12, p * p * 3, requires_grad=True)
    mask = (torch.rand(2, 12) > 0.3).float()
    loss = mnn.NormPixLoss(p, backend=backend)(pred, images, mask)
    target = images.reshape(2, 3, 3, p, 4, p).permute(0, 2, 4, 3, 5, 1).reshape(2, 12, p * p * 3)
    target = (target - target.mean(-1, keepdim=True)) / (target.var(-1, keepdim=True) + 1e-6) ** 0.5
    ref = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    g, = torch.autograd.grad(loss, pred)
    gr, = torch.autograd.grad(ref, pred)
    assert torch.allclose(loss, ref, **TOL) and torch.allclose(g, gr, **TOL)


def test_module_backends_are_checked():
    for make in (lambda: mnn.LayerNorm(4, backend="tpu"), lambda: mnn.Mlp(4, backend="tpu"),
                 lambda: mnn.NormPixLoss(4, backend="tpu"), lambda: mnn.SoftTargetCrossEntropy(backend="tpu")):
        with pytest.raises(ValueError, match="unknown backend"):
            make()
