"""soft_target_cross_entropy (dense and sparse targets) and the fused linear + CE head."""
import pytest
import torch

import maws_kernels as mk
from maws_kernels.cross_entropy import linear_soft_target_cross_entropy, sparse_to_dense
from tests.kernels.tolerance import LOWP, assert_rule

# The CPU tests here run Triton on CPU tensors (interpreted); the gpu-marked ones run compiled kernels.
pytestmark = pytest.mark.interpreter

# (B, V): one row, one class, V not a power of two, V spanning several 4096-wide chunks
SHAPES = [(1, 10), (3, 1), (7, 197), (4, 1000), (2, 9001)]


def _sparse(B, V, T=4):
    ids = torch.randint(0, V, (B, T))
    ids[0, -1] = -1  # padding
    if B > 1 and T > 2:
        ids[1, 2] = ids[1, 1]  # a repeated tag adds up
    w = torch.rand(B, T) + 0.1
    w = w / torch.where(ids >= 0, w, 0).sum(1, keepdim=True)  # rows sum to 1, as WSP targets
    return ids, w


def _logits(B, V, dtype, scale=3.0):
    return (torch.randn(B, V) * scale).to(dtype).requires_grad_()


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("sparse", [False, True])
def test_soft_target_ce_fp32(seeded, shape, sparse):
    B, V = shape
    x = _logits(B, V, torch.float32)
    ids, w = _sparse(B, V)
    dense = sparse_to_dense(ids, w, V)
    if sparse:
        loss = mk.soft_target_cross_entropy(x, target_ids=ids, target_weights=w, backend="triton")
    else:
        loss = mk.soft_target_cross_entropy(x, dense, backend="triton")
    ref = mk.soft_target_cross_entropy_ref(x, dense)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    g = torch.rand(()) + 0.5
    torch.testing.assert_close(torch.autograd.grad(loss * g, x)[0], torch.autograd.grad(ref * g, x)[0],
                               rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("shape", [(3, 197), (2, 9001)])
@pytest.mark.parametrize("dtype", LOWP)
@pytest.mark.parametrize("sparse", [False, True])
def test_soft_target_ce_low_precision_rule(seeded, shape, dtype, sparse):
    B, V = shape
    x = _logits(B, V, dtype)
    ids, w = _sparse(B, V)
    dense = sparse_to_dense(ids, w, V)
    if sparse:
        loss = mk.soft_target_cross_entropy(x, target_ids=ids, target_weights=w, backend="triton")
    else:
        loss = mk.soft_target_cross_entropy(x, dense.to(dtype), backend="triton")
    ref32 = mk.soft_target_cross_entropy_ref(x, dense.to(dtype))  # upcasts logits to fp32
    lowp = mk.soft_target_cross_entropy_ref(x, dense.to(dtype), upcast=False)  # torch in dtype
    assert loss.dtype == torch.float32
    assert_rule(loss, ref32, lowp, dtype, "loss")
    (gx,) = torch.autograd.grad(loss, x)
    assert gx.dtype == dtype
    assert_rule(gx, torch.autograd.grad(ref32, x)[0], torch.autograd.grad(lowp, x)[0], dtype, "d(logits)", atol=1e-5)


def test_soft_target_ce_rows_not_summing_to_one_and_reductions(seeded):
    """The gradient is softmax * sum(t) - t: exact for any target mass, and per-row upstream grads."""
    x = _logits(5, 300, torch.float32)
    t = torch.rand(5, 300) * (torch.rand(5, 300) < 0.05)
    for red in ("mean", "sum", "none"):
        loss = mk.soft_target_cross_entropy(x, t, reduction=red, backend="triton")
        ref_rows = -(t * torch.log_softmax(x, -1)).sum(-1)
        ref = {"mean": ref_rows.mean(), "sum": ref_rows.sum(), "none": ref_rows}[red]
        torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
        up = torch.randn_like(loss)
        # softmax * sum(t) - t cancels where a target matches its softmax: fp32 rounding of the two terms
        # (up to ~|up| * |t| * 2**-23, ~4e-7 here) is absolute, not relative (seen once in CI at atol=1e-7)
        torch.testing.assert_close(torch.autograd.grad(loss, x, up)[0], torch.autograd.grad(ref, x, up)[0],
                                   rtol=1e-5, atol=2e-6)


def test_soft_target_ce_strided_logits(seeded):
    big = torch.randn(4, 700, requires_grad=True)
    x = big[:, 50:550]  # row stride 700
    t = torch.softmax(torch.randn(4, 500), -1)
    loss = mk.soft_target_cross_entropy(x, t, backend="triton")
    ref = mk.soft_target_cross_entropy_ref(x, t)
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(loss, big)[0], torch.autograd.grad(ref, big)[0], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("sparse", [False, True])
@pytest.mark.parametrize("with_bias", [True, False])
def test_linear_soft_target_ce_matches_head_then_ce(seeded, sparse, with_bias):
    B, D, V = 7, 24, 1500
    x = torch.randn(B, D, requires_grad=True)
    W = (torch.randn(V, D) * 0.2).requires_grad_()
    b = (torch.randn(V) * 0.1).requires_grad_() if with_bias else None
    ids, w = _sparse(B, V)
    kw = dict(target_ids=ids, target_weights=w) if sparse else dict(targets=sparse_to_dense(ids, w, V))
    loss = linear_soft_target_cross_entropy(x, W, b, chunk_rows=3, backend="triton", **kw)  # 3 ragged chunks
    logits = x @ W.t() + (b if with_bias else 0)
    ref = mk.soft_target_cross_entropy_ref(logits, sparse_to_dense(ids, w, V))
    torch.testing.assert_close(loss, ref, rtol=1e-5, atol=1e-6)
    leaves = [x, W] + ([b] if with_bias else [])
    g = torch.rand(()) + 0.5
    for a, r in zip(torch.autograd.grad(loss * g, leaves), torch.autograd.grad(ref * g, leaves)):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", LOWP)
def test_linear_soft_target_ce_low_precision_rule(seeded, dtype):
    B, D, V = 6, 32, 700
    x32, W32 = torch.randn(B, D), torch.randn(V, D) * 0.2
    b32 = torch.randn(V) * 0.1
    ids, w = _sparse(B, V)
    dense = sparse_to_dense(ids, w, V)
    x, W, b = (t.to(dtype).requires_grad_() for t in (x32, W32, b32))
    loss = linear_soft_target_cross_entropy(x, W, b, target_ids=ids, target_weights=w, chunk_rows=4, backend="triton")
    xr, Wr, br = (t.detach().float().requires_grad_() for t in (x, W, b))
    ref32 = mk.soft_target_cross_entropy_ref(xr @ Wr.t() + br, dense)
    xl, Wl, bl = (t.detach().clone().requires_grad_() for t in (x, W, b))
    lowp = mk.soft_target_cross_entropy_ref(torch.addmm(bl, xl, Wl.t()), dense.to(dtype), upcast=False)
    assert_rule(loss, ref32, lowp, dtype, "loss")
    ours = torch.autograd.grad(loss, (x, W, b))
    r32 = torch.autograd.grad(ref32, (xr, Wr, br))
    low = torch.autograd.grad(lowp, (xl, Wl, bl))
    for name, a, r, lo in zip(("dx", "dW", "db"), ours, r32, low):
        assert a.dtype == dtype
        assert_rule(a, r, lo, dtype, name, atol=1e-4)


def test_soft_target_ce_compiles_without_graph_break(seeded):
    x = _logits(3, 50, torch.float32)
    ids, w = _sparse(3, 50)
    f = torch.compile(lambda a, i, ww: mk.soft_target_cross_entropy(a, target_ids=i, target_weights=ww, backend="triton"),
                      backend="aot_eager", fullgraph=True)
    y = f(x, ids, w)
    r = mk.soft_target_cross_entropy_ref(x, sparse_to_dense(ids, w, 50))
    torch.testing.assert_close(y, r, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(torch.autograd.grad(y, x)[0], torch.autograd.grad(r, x)[0], rtol=1e-5, atol=1e-7)


def test_soft_target_ce_transposed_targets(seeded):
    x = _logits(4, 30, torch.float32)
    t = torch.softmax(torch.randn(30, 4), 0).t()  # last stride 4
    torch.testing.assert_close(mk.soft_target_cross_entropy(x, t, backend="triton"),
                               mk.soft_target_cross_entropy_ref(x, t), rtol=1e-5, atol=1e-6)


def test_linear_soft_target_ce_compiles_and_skips_gradients_under_no_grad(seeded):
    B, D, V = 5, 16, 300
    x = torch.randn(B, D, requires_grad=True)
    W = (torch.randn(V, D) * 0.2).requires_grad_()
    b = torch.zeros(V, requires_grad=True)
    ids, w = _sparse(B, V)
    f = torch.compile(lambda *a: linear_soft_target_cross_entropy(*a, target_ids=ids, target_weights=w, chunk_rows=2,
                                                                  backend="triton"), backend="aot_eager", fullgraph=True)
    y = f(x, W, b)
    ref = mk.soft_target_cross_entropy_ref(x @ W.t() + b, sparse_to_dense(ids, w, V))
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-6)
    for a, r in zip(torch.autograd.grad(y, (x, W, b)), torch.autograd.grad(ref, (x, W, b))):
        torch.testing.assert_close(a, r, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        out = torch.ops.maws_kernels.linear_soft_target_ce(x, W, b, None, ids, w, 2, False)
        torch.testing.assert_close(linear_soft_target_cross_entropy(x, W, b, target_ids=ids, target_weights=w,
                                                                    backend="triton"), ref.detach(), rtol=1e-5, atol=1e-6)
    assert [t.numel() for t in out[1:]] == [0, 0, 0]  # no gradient GEMMs, no (V, D) buffer


def test_ids_outside_the_vocabulary_are_padding_in_every_backend(seeded):
    x = _logits(2, 20, torch.float32)
    ids = torch.tensor([[3, 25, -1], [7, 20, 19]])
    w = torch.full((2, 3), 0.5)
    a = mk.soft_target_cross_entropy(x, target_ids=ids, target_weights=w, backend="triton")
    b = mk.soft_target_cross_entropy(x, target_ids=ids, target_weights=w, backend="torch")
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    assert sparse_to_dense(ids, w, 20).sum().item() == 1.5  # only ids 3, 7 and 19 count


def test_soft_target_ce_torch_backend_accepts_sparse(seeded):
    x = _logits(3, 40, torch.float32)
    ids, w = _sparse(3, 40)
    a = mk.soft_target_cross_entropy(x, target_ids=ids, target_weights=w, backend="torch")
    torch.testing.assert_close(a, mk.soft_target_cross_entropy_ref(x, sparse_to_dense(ids, w, 40)))


def test_soft_target_ce_rejects_bad_inputs():
    x = torch.randn(2, 5)
    ids = torch.zeros(2, 3, dtype=torch.int64)
    with pytest.raises(ValueError, match="exactly one"):
        mk.soft_target_cross_entropy(x, backend="triton")
    with pytest.raises(ValueError, match="exactly one"):
        mk.soft_target_cross_entropy(x, torch.rand(2, 5), target_ids=ids, target_weights=torch.rand(2, 3))
    with pytest.raises(ValueError, match="must match"):
        mk.soft_target_cross_entropy(x, torch.rand(2, 6), backend="triton")
    with pytest.raises(ValueError, match="int64"):
        mk.soft_target_cross_entropy(x, target_ids=ids.int(), target_weights=torch.rand(2, 3), backend="triton")
    with pytest.raises(ValueError, match=r"\(B, T\)"):
        mk.soft_target_cross_entropy(x, target_ids=ids, target_weights=torch.rand(2, 4), backend="triton")
    with pytest.raises(ValueError, match="reduction"):
        mk.soft_target_cross_entropy(x, torch.rand(2, 5), reduction="avg", backend="triton")
    with pytest.raises(ValueError, match=r"\(V, D\)"):
        linear_soft_target_cross_entropy(torch.randn(2, 4), torch.randn(5, 3), targets=torch.rand(2, 5))
    with pytest.raises(mk.BackendUnavailableError):
        mk.soft_target_cross_entropy(x, torch.rand(2, 5), backend="cuda")
    for backend in ("triton", "torch"):  # one clear message on every backend, never a garbage loss
        with pytest.raises(ValueError, match="floating point"):
            mk.soft_target_cross_entropy(x.long(), torch.rand(2, 5), backend=backend)
        with pytest.raises(ValueError, match="targets is on meta"):
            mk.soft_target_cross_entropy(x, torch.rand(2, 5, device="meta"), backend=backend)
        with pytest.raises(ValueError, match="target_weights is on meta"):
            mk.soft_target_cross_entropy(x, target_ids=ids, target_weights=torch.rand(2, 3, device="meta"),
                                         backend=backend)
        with pytest.raises(ValueError, match="weight is torch.float32 on meta"):
            linear_soft_target_cross_entropy(torch.randn(2, 4), torch.randn(5, 4, device="meta"),
                                             targets=torch.rand(2, 5), backend=backend)
        with pytest.raises(ValueError, match="weight is torch.float32 on cpu but x is torch.bfloat16"):
            linear_soft_target_cross_entropy(torch.randn(2, 4).bfloat16(), torch.randn(5, 4),
                                             targets=torch.rand(2, 5), backend=backend)


@pytest.mark.gpu
@pytest.mark.parametrize("V", [1000, 21841, 30000])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_soft_target_ce_gpu(V, dtype):
    B = 256
    x = (torch.randn(B, V, device="cuda") * 3).to(dtype).requires_grad_()
    ids = torch.randint(0, V, (B, 8), device="cuda")
    w = torch.full((B, 8), 1 / 8, device="cuda")
    dense = sparse_to_dense(ids, w, V)
    for kw in (dict(targets=dense.to(dtype)), dict(target_ids=ids, target_weights=w)):
        loss = mk.soft_target_cross_entropy(x, backend="triton", **kw)
        ref32 = mk.soft_target_cross_entropy_ref(x, dense.to(dtype))
        lowp = mk.soft_target_cross_entropy_ref(x, dense.to(dtype), upcast=False)
        gx = torch.autograd.grad(loss, x)[0]
        if dtype == torch.float32:
            torch.testing.assert_close(loss, ref32, rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(gx, torch.autograd.grad(ref32, x)[0], rtol=1e-4, atol=1e-8)
        else:
            assert_rule(loss, ref32, lowp, dtype, "loss")
            assert_rule(gx, torch.autograd.grad(ref32, x)[0], torch.autograd.grad(lowp, x)[0], dtype, "dx", atol=1e-6)
