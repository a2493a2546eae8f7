"""maws_kernels.layer_norm: the Triton forward / backward (interpreted on CPU, compiled on GPU)
against F.layer_norm, the custom-op registration, and the input checks."""
import importlib
import pytest

import torch
import torch.nn.functional as F

from maws_kernels import BackendUnavailableError
from maws_kernels.layer_norm import _layer_norm_bwd_op, _layer_norm_fwd_op, layer_norm, layer_norm_ref
from tests.kernels.tolerance import LOWP, assert_rule

# The CPU tests here run Triton on CPU tensors (interpreted); the gpu-marked ones run compiled kernels.
pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Awkward widths under the interpreter: tiny, odd, ragged against the power-of-two block, and one
# model width (B/16) with few rows. (197, 33) also runs 4 backward programs of 2 steps, the last ragged.
SHAPES = [(1, 8), (197, 33), (2, 3, 96), (40, 200), (3, 768)]
# fp32: against F.layer_norm. fp16/bf16: the shared low-precision rule (tests/kernels/tolerance.py).
FP32_TOL = dict(atol=2e-5, rtol=2e-5)
GPU_WIDTHS = [512, 768, 1024, 1280, 2560, 4096]


def _inputs(shape, dtype, device="cpu", weight=True, bias=True, w_dtype=None):
    D = shape[-1]
    w_dtype = w_dtype or dtype
    x = torch.randn(shape, device=device, dtype=dtype) * 2 + 0.5  # nonzero mean, non-unit variance
    w = (torch.randn(D, device=device) * 0.5 + 1).to(w_dtype) if weight else None
    b = (torch.randn(D, device=device) * 0.1).to(w_dtype) if bias else None
    for t in (x, w, b):
        if t is not None:
            t.requires_grad_(True)
    return x, w, b


def _run(fn, x, w, b, dy):
    """Forward + backward of ``fn``; returns [y, dx, dw, db] (None for an absent parameter)."""
    y = fn(x, w, b)
    leaves = [t for t in (x, w, b) if t is not None]
    grads = iter(torch.autograd.grad(y, leaves, dy))
    return [y] + [next(grads) if t is not None else None for t in (x, w, b)]


def _ours(x, w, b):
    return layer_norm(x, w, b, 1e-6, backend="triton")


def _upcast_ref(x, w, b):
    return layer_norm_ref(x, w, b, 1e-6, upcast=True)


def _native(x, w, b):
    return F.layer_norm(x, (x.shape[-1],), w, b, 1e-6)


def _check_against_ref(x, w, b, names=("y", "dx", "dw", "db")):
    """Ours vs F.layer_norm: fp32 directly; fp16/bf16 by the 2x-of-torch rule against an fp32 reference."""
    dy = torch.randn(x.shape, device=x.device, dtype=x.dtype)
    ours = _run(_ours, x, w, b, dy)
    assert ours[0].dtype == x.dtype and ours[0].shape == x.shape
    if x.dtype == torch.float32 and (w is None or w.dtype == torch.float32):
        rows = x.numel() // x.shape[-1]
        for name, o, r in zip(names, ours, _run(_native, x, w, b, dy)):
            if r is None:
                continue
            # dw / db are sums over all rows in a different order than torch's: rounding grows ~sqrt(rows)
            tol = dict(FP32_TOL, atol=FP32_TOL["atol"] * max(1, rows) ** 0.5) if name in ("dw", "db") else FP32_TOL
            torch.testing.assert_close(o, r, **tol, msg=lambda m: f"{name}: {m}")
        return
    ref = _run(_upcast_ref, x, w, b, dy.float())
    same = _run(_native, x, w, b, dy)
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


@pytest.mark.parametrize("weight,bias", [(True, False), (False, True), (False, False)])
def test_optional_weight_and_bias(seeded, weight, bias):
    _check_against_ref(*_inputs((37, 40), torch.float32, weight=weight, bias=bias))


def test_fp32_params_with_bf16_activations(seeded):
    x, w, b = _inputs((19, 64), torch.bfloat16, w_dtype=torch.float32)
    dy = torch.randn_like(x)
    y, dx, dw, db = _run(_ours, x, w, b, dy)
    assert y.dtype == dx.dtype == torch.bfloat16 and dw.dtype == db.dtype == torch.float32
    _check_against_ref(x, w, b)


def test_backward_with_many_groups_and_a_looping_reduction(seeded, monkeypatch):
    # 7 backward programs (the last owns a ragged tail), summed 2 partial rows per reduction step:
    # the paths a GPU with many SMs takes, at interpreter size.
    # (the package exports a function of the same name, so fetch the module itself)
    ln = importlib.import_module("maws_kernels.layer_norm")

    monkeypatch.setattr(ln, "_INTERPRET_BWD_PROGRAMS", 7)
    monkeypatch.setattr(ln, "_REDUCE_MAX_G", 2)
    _check_against_ref(*_inputs((220, 40), torch.float32))  # 7 groups of 32 rows, the last 28


def test_non_contiguous_inputs_and_grads(seeded):
    D = 48
    base = torch.randn(D, 30) * 3
    x_t = base.t().requires_grad_(True)  # (30, D) with column stride 30: copied inside
    wide = torch.randn(5, 6, D + 7)
    x_s = wide[..., :D].requires_grad_(True)  # row stride D + 7, unit column stride: used in place
    w = torch.randn(D, requires_grad=True)
    b = torch.randn(D, requires_grad=True)
    for x in (x_t, x_s):
        assert not x.is_contiguous()
        # y.sum() gives the backward a stride-0 (expanded) dy
        ours = torch.autograd.grad(_ours(x, w, b).sum(), (x, w, b))
        ref = torch.autograd.grad(_native(x, w, b).sum(), (x, w, b))
        for o, r in zip(ours, ref):
            torch.testing.assert_close(o, r, **FP32_TOL)
        torch.testing.assert_close(_ours(x, w, b), _native(x, w, b), **FP32_TOL)


def test_parameters_without_grad_and_empty_rows(seeded):
    x = torch.randn(6, 24, requires_grad=True)
    w, b = torch.randn(24), torch.randn(24)  # frozen
    (dx,) = torch.autograd.grad(_ours(x, w, b), x, torch.ones(6, 24) * 0.5)
    (dx_ref,) = torch.autograd.grad(_native(x, w, b), x, torch.ones(6, 24) * 0.5)
    torch.testing.assert_close(dx, dx_ref, **FP32_TOL)
    x, w, b = _inputs((0, 24), torch.float32)
    y, dx, dw, db = _run(_ours, x, w, b, torch.empty(0, 24))
    assert y.shape == (0, 24) and dx.shape == (0, 24)
    assert torch.equal(dw, torch.zeros(24)) and torch.equal(db, torch.zeros(24))


def test_torch_backend_is_native_layer_norm(seeded):
    x, w, b = _inputs((4, 7, 20), torch.float32)
    assert torch.equal(layer_norm(x, w, b, 1e-5, backend="torch"), F.layer_norm(x, (20,), w, b, 1e-5))
    assert torch.equal(layer_norm_ref(x, w, b), F.layer_norm(x, (20,), w, b, 1e-6))
    assert layer_norm_ref(x.half(), w.half(), b.half(), upcast=True).dtype == torch.float32


def test_compile_fullgraph(seeded):
    x, w, b = _inputs((2, 9, 40), torch.float32)

    def step(x, w, b):
        return (layer_norm(x, w, b, backend="triton") * 1.5).sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, w, b), (x, w, b))
    want = torch.autograd.grad(step(x, w, b), (x, w, b))
    for g, r in zip(got, want):
        torch.testing.assert_close(g, r, **FP32_TOL)


def test_custom_op_registration(seeded):
    # Schema, fake (meta) impls, autograd registration and AOT dispatch of both ops.
    x, w, b = _inputs((5, 24), torch.float32)
    torch.library.opcheck(_layer_norm_fwd_op, (x, w, b, 1e-6))
    torch.library.opcheck(_layer_norm_fwd_op, (x, None, None, 1e-6))
    y, mean, rstd = _layer_norm_fwd_op(x.detach(), w.detach(), b.detach(), 1e-6)
    dy = torch.randn_like(y)
    torch.library.opcheck(_layer_norm_bwd_op, (dy, x.detach(), w.detach(), mean, rstd, torch.float32),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))


def test_bad_inputs_raise(seeded):
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"weight must have shape \(16,\)"):
        layer_norm(x, torch.ones(15), None, backend="triton")
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        layer_norm(x, torch.ones(16), torch.zeros(4, 4), backend="torch")
    with pytest.raises(ValueError, match="weight is on meta"):
        layer_norm(x, torch.ones(16, device="meta"), None)
    with pytest.raises(ValueError, match="D >= 1"):
        layer_norm(torch.tensor(1.0), None, None)
    with pytest.raises(ValueError, match="D >= 1"):
        layer_norm(torch.randn(3, 0), None, None)
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        layer_norm(x.double(), None, None, backend="triton")
    with pytest.raises(ValueError, match="D <= 16384"):
        layer_norm(torch.randn(1, 16385), None, None, backend="triton")


def test_unavailable_backends_raise(monkeypatch):
    x = torch.randn(2, 8)
    with pytest.raises(BackendUnavailableError, match="layer_norm"):
        layer_norm(x, None, None, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailableError, match="needs a CUDA device"):
        layer_norm(x, None, None, backend="triton")


@pytest.mark.gpu
class TestOnGpu:
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("D", GPU_WIDTHS)
    def test_model_widths(self, seeded, D, dtype):
        # 3001 rows: ragged against every BLOCK_M and against the persistent backward's row groups.
        _check_against_ref(*_inputs((3001, D), dtype, device="cuda"))

    @pytest.mark.parametrize("weight,bias", [(True, False), (False, False)])
    def test_optional_params(self, seeded, weight, bias):
        _check_against_ref(*_inputs((4, 197, 768), torch.bfloat16, device="cuda", weight=weight, bias=bias))

    def test_mae_shapes_and_fp32_params(self, seeded):
        # B/16 encoder (batch 64, 49 kept + cls) and decoder (196 + cls) rows, fp32 master params.
        _check_against_ref(*_inputs((64, 50, 768), torch.bfloat16, device="cuda", w_dtype=torch.float32))
        _check_against_ref(*_inputs((64, 197, 512), torch.bfloat16, device="cuda", w_dtype=torch.float32))

    def test_backward_is_deterministic(self, seeded):
        x, w, b = _inputs((50_000, 1024), torch.bfloat16, device="cuda")
        dy = torch.randn_like(x)
        first = _run(_ours, x, w, b, dy)
        for _ in range(3):
            for a, c in zip(first, _run(_ours, x, w, b, dy)):
                assert torch.equal(a, c)

    def test_compile_inductor(self, seeded):
        x, w, b = _inputs((8, 50, 1280), torch.bfloat16, device="cuda")

        def step(x, w, b):
            return (layer_norm(x, w, b, backend="triton").float() ** 2).mean()

        compiled = torch.compile(step, fullgraph=True)
        got = torch.autograd.grad(compiled(x, w, b), (x, w, b))
        want = torch.autograd.grad(step(x, w, b), (x, w, b))
        for g, r in zip(got, want):
            torch.testing.assert_close(g, r, atol=1e-3, rtol=1e-2)
