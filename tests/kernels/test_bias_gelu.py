"""maws_kernels.bias_gelu: the Triton forward / backward (interpreted on CPU, compiled on GPU)
against F.gelu(x + bias), both bias-gradient paths, the custom-op registration, and the input checks."""
import importlib

import pytest
import torch
import torch.nn.functional as F

from maws_kernels import BackendUnavailableError
from maws_kernels.bias_gelu import _bias_gelu_bwd_op, _bias_gelu_fwd_op, bias_gelu, bias_gelu_ref
from tests.kernels.tolerance import LOWP, assert_rule

# The CPU tests here run Triton on CPU tensors (interpreted); the gpu-marked ones run compiled kernels.
pytestmark = pytest.mark.interpreter

# (the package will export a function of the same name, so fetch the module itself)
bg = importlib.import_module("maws_kernels.bias_gelu")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Awkward shapes under the interpreter: one row, odd N, N ragged against the power-of-two tiles
# (200 vs 256; 1000 vs the forward's 1024 and the backward's 2 x 512), a 3-D input, and the ViT-B/16
# MLP width with few rows (3 forward column tiles, 6 backward ones walked by one program).
SHAPES = [(1, 8), (37, 33), (2, 3, 96), (40, 200), (5, 1000), (3, 3072)]
# fp32: against F.gelu. fp16/bf16: the shared low-precision rule (tests/kernels/tolerance.py).
FP32_TOL = dict(atol=1e-5, rtol=1e-5)
GPU_WIDTHS = [2048, 3072, 4096, 5120, 10240, 16384]


def _inputs(shape, dtype, device="cpu", bias=True, b_dtype=None):
    """x with a sweep over [-6, 6] at its start (the tails and the kink at 0) and N(0, 2^2) after it."""
    N = shape[-1]
    x = torch.randn(shape, device=device) * 2
    flat = x.view(-1)
    k = min(flat.numel(), 64)
    flat[:k] = torch.linspace(-6, 6, k, device=device) + 0.01 * torch.randn(k, device=device)
    x = x.to(dtype).requires_grad_(True)
    b = (torch.randn(N, device=device) * 0.5).to(b_dtype or dtype).requires_grad_(True) if bias else None
    return x, b


def _run(fn, x, b, dy):
    """Forward + backward of ``fn``; returns [y, dx, db] (db None without a bias)."""
    y = fn(x, b)
    leaves = [t for t in (x, b) if t is not None]
    grads = iter(torch.autograd.grad(y, leaves, dy))
    return [y] + [next(grads) if t is not None else None for t in (x, b)]


def _ours(x, b):
    return bias_gelu(x, b, backend="triton")


def _upcast_ref(x, b):
    return bias_gelu_ref(x, b, upcast=True)


def _native(x, b):
    return F.gelu(x + b) if b is not None else F.gelu(x)


def _check_against_ref(x, b, names=("y", "dx", "db")):
    """Ours vs torch: fp32 against F.gelu directly; fp16/bf16 by the 2x-of-torch rule against fp32."""
    dy = torch.randn(x.shape, device=x.device, dtype=x.dtype)
    ours = _run(_ours, x, b, dy)
    assert ours[0].dtype == x.dtype and ours[0].shape == x.shape
    assert ours[1].dtype == x.dtype and (b is None or ours[2].dtype == b.dtype)
    if x.dtype == torch.float32 and (b is None or b.dtype == torch.float32):
        rows = x.numel() // x.shape[-1]
        for name, o, r in zip(names, ours, _run(_native, x, b, dy)):
            if r is None:
                assert o is None
                continue
            # db is a sum over all rows in a different order than torch's: rounding grows ~sqrt(rows)
            tol = dict(FP32_TOL, atol=FP32_TOL["atol"] * max(1, rows) ** 0.5) if name == "db" else FP32_TOL
            torch.testing.assert_close(o, r, **tol, msg=lambda m: f"{name}: {m}")
        return
    ref = _run(_upcast_ref, x, b, dy.float())
    # the same-dtype torch op: bias_gelu_ref keeps y in x's dtype when an fp32 bias promotes x + bias
    same = _run(bias_gelu_ref, x, b, dy)
    for name, o, t, r in zip(names, ours, same, ref):
        if r is None:
            assert o is None
            continue
        assert o.dtype == t.dtype, name
        assert_rule(o, r, t, o.dtype if o.dtype in LOWP else x.dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_torch(seeded, shape, dtype):
    _check_against_ref(*_inputs(shape, dtype))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", [(37, 33), (2, 3, 96)], ids=str)
def test_without_bias(seeded, shape, dtype):
    _check_against_ref(*_inputs(shape, dtype, bias=False))


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16], ids=str)
def test_fp32_bias_with_lowp_activations(seeded, dtype):
    # bf16 autocast: x is the GEMM's bf16 output, the bias an fp32 master parameter.
    x, b = _inputs((19, 200), dtype, b_dtype=torch.float32)
    y, dx, db = _run(_ours, x, b, torch.randn_like(x))
    assert y.dtype == dx.dtype == dtype and db.dtype == torch.float32
    _check_against_ref(x, b)
    # The fp32 bias is added in fp32: with x = -1024 and bias = 1024 + d, z = d exactly, while a bias
    # rounded to x's dtype first (ulp 8 in bf16, 1 in fp16 at 1024) would give z = a multiple of that.
    d = torch.rand(64) * 6 - 3
    xs = torch.full((3, 64), -1024.0).to(dtype).requires_grad_(True)
    bs = (1024.0 + d).requires_grad_(True)
    y, dx, db = _run(_ours, xs, bs, torch.ones(3, 64, dtype=dtype))
    torch.testing.assert_close(y.float(), F.gelu(d).expand(3, 64), atol=1e-2, rtol=1e-2)
    torch.testing.assert_close(db, 3 * torch.autograd.grad(F.gelu(d.requires_grad_(True)).sum(), d)[0], atol=3e-2,
                               rtol=1e-2)


def test_gelu_derivative_is_exact_erf_form(seeded):
    # Against the closed form Phi(z) + z * phi(z) in fp64, not just against torch's autograd.
    x, b = _inputs((9, 64), torch.float32)
    (dx,) = torch.autograd.grad(_ours(x, b), x, torch.ones(9, 64))
    z = x.detach().double() + b.detach().double()
    want = 0.5 * (1 + torch.erf(z / 2 ** 0.5)) + z * torch.exp(-0.5 * z * z) / (2 * torch.pi) ** 0.5
    torch.testing.assert_close(dx.double(), want, atol=1e-6, rtol=1e-6)
    # and not the tanh approximation, which differs by up to ~1e-3 around |z| ~ 2..3
    assert (F.gelu(x + b, approximate="tanh") - _ours(x, b)).abs().max() > 1e-4


@pytest.mark.parametrize("dtype,b_dtype", [(torch.float32, torch.float32), (torch.bfloat16, torch.float32),
                                           (torch.float16, torch.float16)], ids=str)
def test_fused_and_torch_summed_dbias_agree(seeded, monkeypatch, dtype, b_dtype):
    x, b = _inputs((70, 150), dtype, b_dtype=b_dtype)
    _check_against_ref(x, b)  # the fused path (the default) against torch
    dy = torch.randn_like(x)
    fused = _run(_ours, x, b, dy)
    monkeypatch.setattr(bg, "_FUSE_DBIAS", False)
    summed = _run(_ours, x, b, dy)
    assert torch.equal(fused[0], summed[0]) and torch.equal(fused[1], summed[1])  # same kernels for y, dx
    assert fused[2].dtype == summed[2].dtype == b_dtype
    # torch sums dx already rounded to x's dtype, the fused kernel sums fp32 dz: the two differ by
    # exactly the summed rounding of dx (zero in fp32), up to an ulp of each final rounding to b_dtype.
    x32 = x.detach().float().requires_grad_(True)
    (dz32,) = torch.autograd.grad(_upcast_ref(x32, b.detach()), x32, dy.float())
    expected = (fused[1].float() - dz32).sum(0)
    eps = torch.finfo(b_dtype).eps if b_dtype != torch.float32 else 0.0
    atol = 1e-5 * 70 ** 0.5 + 2 * eps * summed[2].abs().max().item()
    torch.testing.assert_close(summed[2].float() - fused[2].float(), expected, atol=atol, rtol=0)


def test_backward_with_many_groups_column_tiles_and_a_looping_reduction(seeded, monkeypatch):
    # 7 backward programs (the last owns a ragged tail) x 3 column tiles (the last ragged), summed 2
    # partial rows per reduction step: the paths a GPU with many SMs and N up to 16384 takes.
    monkeypatch.setattr(bg, "_INTERPRET_BWD_PROGRAMS", 7)
    monkeypatch.setattr(bg, "_REDUCE_MAX_G", 2)
    monkeypatch.setattr(bg, "_BWD_MAX_BLOCK_N", 64)
    monkeypatch.setattr(bg, "_FWD_MAX_BLOCK_N", 64)
    assert bg._config(150, bg._BWD_TILE, bg._BWD_MAX_BLOCK_N, bg._BWD_WARPS)[:2] == (64, 32)
    _check_against_ref(*_inputs((220, 150), torch.float32))  # 7 groups of 32 rows, the last 28
    _check_against_ref(*_inputs((220, 150), torch.bfloat16, b_dtype=torch.float32))


def test_non_contiguous_inputs_and_grads(seeded):
    N = 48
    x_t = (torch.randn(N, 30) * 2).t().requires_grad_(True)  # (30, N) with column stride 30: copied inside
    wide = torch.randn(5, 6, N + 7) * 2
    x_s = wide[..., :N].requires_grad_(True)  # row stride N + 7, unit column stride: used in place
    b_s = torch.randn(N, 2)[:, 0].requires_grad_(True)  # bias with stride 2
    b = torch.randn(N, requires_grad=True)
    for x, bias in ((x_t, b), (x_s, b), (x_s, b_s)):
        assert not x.is_contiguous()
        # y.sum() gives the backward a stride-0 (expanded) dy
        ours = torch.autograd.grad(_ours(x, bias).sum(), (x, bias))
        ref = torch.autograd.grad(_native(x, bias).sum(), (x, bias))
        for o, r in zip(ours, ref):
            torch.testing.assert_close(o, r, **dict(FP32_TOL, atol=1e-4))
        torch.testing.assert_close(_ours(x, bias), _native(x, bias), **FP32_TOL)


def test_frozen_bias_frozen_x_and_empty_rows(seeded):
    x, b = _inputs((6, 24), torch.float32)
    frozen = b.detach()
    dy = torch.randn(6, 24)
    (dx,) = torch.autograd.grad(_ours(x, frozen), x, dy)
    (dx_ref,) = torch.autograd.grad(_native(x, frozen), x, dy)
    torch.testing.assert_close(dx, dx_ref, **FP32_TOL)
    (db,) = torch.autograd.grad(_ours(x.detach(), b), b, dy)
    (db_ref,) = torch.autograd.grad(_native(x.detach(), b), b, dy)
    torch.testing.assert_close(db, db_ref, **dict(FP32_TOL, atol=1e-4))
    x, b = _inputs((0, 24), torch.float32)
    y, dx, db = _run(_ours, x, b, torch.empty(0, 24))
    assert y.shape == (0, 24) and dx.shape == (0, 24)
    assert torch.equal(db, torch.zeros(24))


def test_torch_backend_and_reference(seeded):
    x, b = _inputs((4, 7, 20), torch.float32)
    assert torch.equal(bias_gelu(x, b, backend="torch"), F.gelu(x + b))
    assert torch.equal(bias_gelu(x, None, backend="torch"), F.gelu(x))
    assert torch.equal(bias_gelu_ref(x, b), F.gelu(x + b))
    xb = x.detach().bfloat16().requires_grad_(True)
    y = bias_gelu(xb, b, backend="torch")  # fp32 bias promotes x + bias: y is still bf16
    assert y.dtype == torch.bfloat16 and torch.equal(y, F.gelu(xb + b).bfloat16())
    dx, db = torch.autograd.grad(y, (xb, b), torch.randn_like(y))
    assert dx.dtype == torch.bfloat16 and db.dtype == torch.float32
    assert bias_gelu_ref(x.half(), b.half(), upcast=True).dtype == torch.float32
    assert bias_gelu_ref(x.half(), b, upcast=False).dtype == torch.float16


def test_compile_fullgraph(seeded):
    x, b = _inputs((2, 9, 40), torch.float32)

    def step(x, b):
        return (bias_gelu(x, b, backend="triton") * 1.5).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, b), (x, b))
    want = torch.autograd.grad(step(x, b), (x, b))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **FP32_TOL)
    ref = torch.autograd.grad((_native(x, b) * 1.5).sum(), (x, b))
    for g, r in zip(got, ref):
        torch.testing.assert_close(g, r, **dict(FP32_TOL, atol=1e-4))


def test_custom_op_registration(seeded):
    # Schema, fake (meta) impls, autograd registration and AOT dispatch of both ops.
    x, b = _inputs((5, 24), torch.float32)
    torch.library.opcheck(_bias_gelu_fwd_op, (x, b, True))
    torch.library.opcheck(_bias_gelu_fwd_op, (x, None, False))
    xb, bf = _inputs((5, 24), torch.bfloat16, b_dtype=torch.float32)
    torch.library.opcheck(_bias_gelu_fwd_op, (xb, bf, True))
    dy = torch.randn(5, 24)
    utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    for args in ((dy, x.detach(), b.detach(), True, True), (dy, x.detach(), b.detach(), True, False),
                 (dy, x.detach(), b.detach(), False, True), (dy, x.detach(), None, False, True)):
        torch.library.opcheck(_bias_gelu_bwd_op, args, test_utils=utils)
    dx, db = _bias_gelu_bwd_op(dy, x.detach(), None, False, True)
    assert dx.shape == (5, 24) and db.shape == (0,)


def test_bad_inputs_raise(seeded):
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        bias_gelu(x, torch.ones(15), backend="triton")
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        bias_gelu(x, torch.zeros(4, 16), backend="torch")
    with pytest.raises(ValueError, match="bias is on meta"):
        bias_gelu(x, torch.ones(16, device="meta"))
    with pytest.raises(ValueError, match="N >= 1"):
        bias_gelu(torch.tensor(1.0))
    with pytest.raises(ValueError, match="N >= 1"):
        bias_gelu(torch.randn(3, 0))
    with pytest.raises(ValueError, match="fp32/fp16/bf16 x"):
        bias_gelu(x.double(), backend="triton")
    with pytest.raises(ValueError, match="fp32/fp16/bf16 bias"):
        bias_gelu(x, torch.ones(16, dtype=torch.float64), backend="triton")


def test_unavailable_backends_raise(monkeypatch):
    x = torch.randn(2, 8)
    with pytest.raises(BackendUnavailableError, match="bias_gelu"):
        bias_gelu(x, None, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailableError, match="needs a CUDA device"):
        bias_gelu(x, None, backend="triton")


@pytest.mark.gpu
class TestOnGpu:
    @pytest.mark.parametrize("N", GPU_WIDTHS)
    @pytest.mark.parametrize("M", [50 * 256, 197 * 256])
    def test_mlp_widths(self, seeded, M, N):
        # encoder (49 kept + cls) and decoder / WSP (196 + cls) rows at batch 256, bf16, fp32 bias
        _check_against_ref(*_inputs((M, N), torch.bfloat16, device="cuda", b_dtype=torch.float32))

    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    def test_dtypes_and_ragged_rows(self, seeded, dtype):
        # 3001 rows: ragged against every BLOCK_M and against the persistent backward's row groups.
        _check_against_ref(*_inputs((3001, 3072), dtype, device="cuda"))
        _check_against_ref(*_inputs((3001, 1000), dtype, device="cuda"))
        _check_against_ref(*_inputs((7, 197, 5120), dtype, device="cuda", bias=False))

    def test_fused_and_torch_summed_dbias_agree(self, seeded, monkeypatch):
        x, b = _inputs((197 * 64, 4096), torch.bfloat16, device="cuda", b_dtype=torch.float32)
        dy = torch.randn_like(x)
        fused = _run(_ours, x, b, dy)
        monkeypatch.setattr(bg, "_FUSE_DBIAS", False)
        summed = _run(_ours, x, b, dy)
        assert torch.equal(fused[1], summed[1])
        ref = _run(_upcast_ref, x, b, dy.float())[2]
        assert (fused[2] - ref).abs().max() <= 2 * (summed[2] - ref).abs().max() + 1e-2

    def test_backward_is_deterministic(self, seeded):
        x, b = _inputs((50_000, 3072), torch.bfloat16, device="cuda", b_dtype=torch.float32)
        dy = torch.randn_like(x)
        first = _run(_ours, x, b, dy)
        for _ in range(3):
            for a, c in zip(first, _run(_ours, x, b, dy)):
                assert torch.equal(a, c)

    def test_compile_inductor(self, seeded):
        x, b = _inputs((8, 50, 5120), torch.bfloat16, device="cuda", b_dtype=torch.float32)

        def step(x, b):
            return (bias_gelu(x, b, backend="triton").float() ** 2).mean()

        compiled = torch.compile(step, fullgraph=True)
        got = torch.autograd.grad(compiled(x, b), (x, b))
        want = torch.autograd.grad(step(x, b), (x, b))
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, atol=1e-3, rtol=1e-2)
