"""maws_kernels.add_layer_norm: the Triton forward / backward (interpreted on CPU, compiled on GPU)
against the eager composition (bias add, residual add, F.layer_norm), the custom-op registration,
the shared dx / dresidual tensor, and the input checks."""
import importlib
import itertools

import pytest
import torch
import torch.nn.functional as F

from maws_kernels import BackendUnavailableError
from maws_kernels.add_layer_norm import (
    _add_layer_norm_bwd_op,
    _add_layer_norm_fwd_op,
    add_layer_norm,
    add_layer_norm_ref,
)
from tests.kernels.tolerance import LOWP, assert_rule

# The CPU tests here run Triton on CPU tensors (interpreted); the gpu-marked ones run compiled kernels.
pytestmark = pytest.mark.interpreter

# the package may export a function of the same name: fetch the module itself for monkeypatching
aln = importlib.import_module("maws_kernels.add_layer_norm")

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Awkward widths under the interpreter: tiny, odd, ragged against the power-of-two block, and one
# model width (B/16) with few rows. (197, 33) also runs 4 backward programs of 2 steps, the last ragged.
SHAPES = [(1, 8), (197, 33), (2, 3, 96), (40, 200), (3, 768)]
FP32_TOL = dict(atol=2e-5, rtol=2e-5)
GPU_WIDTHS = [512, 768, 1024, 1280, 2560, 4096]
NAMES = ("y", "s", "dx", "dresidual", "dweight", "dbias", "dx_bias")


def _inputs(shape, dtype, device="cpu", residual=True, x_bias=True, weight=True, bias=True, r_dtype=None,
            p_dtype=None):
    """(x, residual, weight, bias, x_bias), all requiring grad; None where switched off."""
    D = shape[-1]
    p_dtype = p_dtype or dtype
    x = torch.randn(shape, device=device) * 2 + 0.5  # nonzero mean, non-unit variance
    r = torch.randn(shape, device=device) * 3 - 1.0 if residual else None
    w = torch.randn(D, device=device) * 0.5 + 1 if weight else None
    b = torch.randn(D, device=device) * 0.1 if bias else None
    xb = torch.randn(D, device=device) * 0.3 if x_bias else None
    out = [x.to(dtype), r.to(r_dtype or dtype) if r is not None else None] + [
        t.to(p_dtype) if t is not None else None for t in (w, b, xb)]
    return tuple(t.requires_grad_(True) if t is not None else None for t in out)


def _run(fn, args, dy, ds):
    """Forward + backward of ``fn``; [y, s, dx, dresidual, dweight, dbias, dx_bias] (None: absent input).
    ``ds`` None: s is not used downstream, only y is."""
    y, s = fn(*args)
    leaves = [t for t in args if t is not None]
    outs, grads_in = ((y, s), (dy, ds)) if ds is not None else ((y,), (dy,))
    grads = iter(torch.autograd.grad(outs, leaves, grads_in))
    return [y, s] + [next(grads) if t is not None else None for t in args]


def _ours(x, r, w, b, xb):
    return add_layer_norm(x, r, w, b, 1e-6, x_bias=xb, backend="triton")


def _torch(x, r, w, b, xb):
    return add_layer_norm(x, r, w, b, 1e-6, x_bias=xb, backend="torch")


def _upcast_ref(x, r, w, b, xb):
    return add_layer_norm_ref(x, r, w, b, 1e-6, x_bias=xb, upcast=True)


def _grads_in(args, use_ds):
    x, r = args[0], args[1]
    dy = torch.randn(x.shape, device=x.device, dtype=x.dtype)
    ds = torch.randn(x.shape, device=x.device, dtype=(r if r is not None else x).dtype) if use_ds else None
    return dy, ds


def _check_against_ref(args, use_ds=True):
    """Ours vs the eager composition: fp32 directly; otherwise the 2x-of-torch rule against an fp32 reference."""
    x, r = args[0], args[1]
    dy, ds = _grads_in(args, use_ds)
    ours = _run(_ours, args, dy, ds)
    s_dtype = (r if r is not None else x).dtype
    assert ours[0].dtype == x.dtype and ours[0].shape == x.shape
    assert ours[1].dtype == s_dtype and ours[1].shape == x.shape
    for o, t in zip(ours[2:], args):
        assert (o is None) == (t is None) and (o is None or (o.dtype == t.dtype and o.shape == t.shape))
    if all(t is None or t.dtype == torch.float32 for t in args):
        rows = x.numel() // x.shape[-1]
        for name, o, t in zip(NAMES, ours, _run(_torch, args, dy, ds)):
            if t is None:
                continue
            # column sums run in another order than torch's: rounding grows ~sqrt(rows)
            sums = name in ("dweight", "dbias", "dx_bias")
            tol = dict(FP32_TOL, atol=FP32_TOL["atol"] * max(1, rows) ** 0.5) if sums else FP32_TOL
            torch.testing.assert_close(o, t, **tol, msg=lambda m: f"{name}: {m}")
        return
    ref = _run(_upcast_ref, args, dy.float(), ds.float() if ds is not None else None)
    same = _run(_torch, args, dy, ds)
    for name, o, t, r32 in zip(NAMES, ours, same, ref):
        if r32 is None:
            assert o is None
            continue
        assert o.dtype == t.dtype, name
        assert_rule(o, r32, t, o.dtype if o.dtype in LOWP else x.dtype, name)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("shape", SHAPES, ids=str)
def test_matches_torch(seeded, shape, dtype):
    _check_against_ref(_inputs(shape, dtype))


@pytest.mark.parametrize("residual,x_bias,weight,bias,use_ds", list(itertools.product((True, False), repeat=5)))
def test_optional_inputs_and_ds(seeded, residual, x_bias, weight, bias, use_ds):
    _check_against_ref(_inputs((13, 40), torch.float32, residual=residual, x_bias=x_bias, weight=weight,
                               bias=bias), use_ds)


@pytest.mark.parametrize("use_ds", [True, False])
def test_lowp_without_ds_or_residual(seeded, use_ds):
    _check_against_ref(_inputs((29, 72), torch.bfloat16, residual=False), use_ds)
    _check_against_ref(_inputs((29, 72), torch.float16), use_ds=False)


@pytest.mark.parametrize("r_dtype,p_dtype", [(torch.float32, torch.float32), (torch.float32, torch.bfloat16),
                                             (torch.bfloat16, torch.float32)])
def test_mixed_dtypes(seeded, r_dtype, p_dtype):
    # bf16 branch with an fp32 residual stream and / or fp32 (autocast master) parameters
    args = _inputs((19, 64), torch.bfloat16, r_dtype=r_dtype, p_dtype=p_dtype)
    _check_against_ref(args)
    dy, ds = _grads_in(args, True)
    y, s, dx, dr, dw, db, dxb = _run(_ours, args, dy, ds)
    assert y.dtype == dx.dtype == torch.bfloat16 and s.dtype == dr.dtype == r_dtype
    assert dw.dtype == db.dtype == dxb.dtype == p_dtype
    if r_dtype != torch.bfloat16:
        # two stores of one fp32 value: they differ by the bf16 rounding (truncation when interpreted)
        assert dx.data_ptr() != dr.data_ptr()
        ulp = torch.finfo(torch.bfloat16).eps * dr.abs().clamp_min(2 ** -100)
        assert ((dx.float() - dr).abs() <= ulp).all()


def test_statistics_come_from_the_rounded_s(seeded):
    # fp32 branch into a bf16 stream: s is rounded to bf16 (~3e-3 relative), y stays fp32 and must be
    # the LayerNorm of the ROUNDED s (as the backward, which re-reads s, assumes), not of the fp32 sum.
    x, r, w, b, xb = (t.detach() for t in _inputs((8, 256), torch.float32, r_dtype=torch.bfloat16))
    y, s = _ours(x, r, w, b, xb)
    assert y.dtype == torch.float32 and s.dtype == torch.bfloat16
    e_rounded = (y - F.layer_norm(s.float(), (256,), w, b, 1e-6)).abs().max()
    e_unrounded = (y - F.layer_norm(r.float() + x + xb, (256,), w, b, 1e-6)).abs().max()
    assert e_rounded < 1e-4 and e_unrounded > 10 * e_rounded


def test_backward_with_many_groups_and_a_looping_reduction(seeded, monkeypatch):
    # 7 backward programs (the last owns a ragged tail), summed 2 partial rows per reduction step:
    # the paths a GPU with many SMs takes, at interpreter size.
    monkeypatch.setattr(aln, "_INTERPRET_BWD_PROGRAMS", 7)
    monkeypatch.setattr(aln, "_REDUCE_MAX_G", 2)
    _check_against_ref(_inputs((220, 40), torch.float32))  # 7 groups of 32 rows, the last 28
    _check_against_ref(_inputs((220, 40), torch.float32, weight=False, bias=False))  # K = 1: only dx_bias


def test_non_contiguous_inputs_and_grads(seeded):
    D = 48
    x_t = (torch.randn(D, 30) * 3).t().requires_grad_(True)  # (30, D), column stride 30: copied inside
    r_t = torch.randn(D, 30).t().requires_grad_(True)
    wide = torch.randn(2, 5, 6, D + 7)
    x_s = wide[0, ..., :D].requires_grad_(True)  # row stride D + 7, unit column stride: used in place
    r_s = wide[1, ..., 3:D + 3].requires_grad_(True)
    w, b, xb = (torch.randn(D, requires_grad=True) for _ in range(3))
    for x, r in ((x_t, r_t), (x_s, r_s), (x_s, r_t.reshape(5, 6, D))):
        assert not x.is_contiguous()
        leaves = [t for t in (x, r, w, b, xb) if t.requires_grad]
        # .sum() gives the backward stride-0 (expanded) dy and ds
        ours, ref = (torch.autograd.grad(sum(o.sum() * c for o, c in zip(fn(x, r, w, b, xb), (1.0, 0.5))), leaves)
                     for fn in (_ours, _torch))
        for o, t in zip(ours, ref):
            torch.testing.assert_close(o, t, **FP32_TOL)
        for o, t in zip(_ours(x, r, w, b, xb), _torch(x, r, w, b, xb)):
            torch.testing.assert_close(o, t, **FP32_TOL)


def test_dx_and_dresidual_are_one_tensor_and_leaf_grads_accumulate(seeded):
    x, r, w, b, xb = _inputs((11, 24), torch.float32)
    dy, ds = _grads_in((x, r), True)
    y, s = _ours(x, r, w, b, xb)
    gx, gr = torch.autograd.grad((y, s), (x, r), (dy, ds))
    assert gx.data_ptr() == gr.data_ptr()  # one write, no copy
    want = torch.autograd.grad(_torch(x, r, w, b, xb), (x, r), (dy, ds))[0]
    # .grad of both leaves, accumulated over two backward passes: sharing must not double-count
    for _ in range(2):
        y, s = _ours(x, r, w, b, xb)
        torch.autograd.backward((y, s), (dy, ds))
    assert x.grad.data_ptr() != r.grad.data_ptr()
    torch.testing.assert_close(x.grad, 2 * want, **FP32_TOL)
    torch.testing.assert_close(r.grad, 2 * want, **FP32_TOL)


def test_unused_s_sends_no_ds_and_unused_y_no_dy(seeded, monkeypatch):
    seen = []
    real = aln._bwd_triton

    def spy(dy, ds, *rest):
        seen.append(ds is None)
        return real(dy, ds, *rest)

    monkeypatch.setattr(aln, "_bwd_triton", spy)
    x, r, w, b, xb = _inputs((9, 24), torch.float32)
    y, s = _ours(x, r, w, b, xb)
    torch.autograd.grad(y.sum(), (x,))
    y, s = _ours(x, r, w, b, xb)
    torch.autograd.grad((y.sum(), s.sum()), (x,))
    assert seen == [True, False]
    # only s used: the LayerNorm adds nothing, every gradient is ds's
    ds = torch.randn(9, 24)
    y, s = _ours(x, r, w, b, xb)
    dx, dr, dw, db, dxb = torch.autograd.grad(s, (x, r, w, b, xb), ds)
    assert torch.equal(dx, ds) and torch.equal(dr, ds)
    assert torch.equal(dw, torch.zeros(24)) and torch.equal(db, torch.zeros(24))
    torch.testing.assert_close(dxb, ds.sum(0), **FP32_TOL)


def test_frozen_parameters_and_empty_rows(seeded):
    x = torch.randn(6, 24, requires_grad=True)
    r, w, b, xb = torch.randn(6, 24), torch.randn(24), torch.randn(24), torch.randn(24)  # no grad
    dy = torch.randn(6, 24)
    (dx,) = torch.autograd.grad(_ours(x, r, w, b, xb)[0], x, dy)
    (want,) = torch.autograd.grad(_torch(x, r, w, b, xb)[0], x, dy)
    torch.testing.assert_close(dx, want, **FP32_TOL)
    args = _inputs((0, 24), torch.float32)
    y, s, dx, dr, dw, db, dxb = _run(_ours, args, torch.empty(0, 24), torch.empty(0, 24))
    assert y.shape == s.shape == dx.shape == dr.shape == (0, 24)
    for g in (dw, db, dxb):
        assert torch.equal(g, torch.zeros(24))


def test_torch_backend_and_reference(seeded):
    x, r, w, b, xb = (t.detach() for t in _inputs((4, 7, 20), torch.float32))
    y, s = add_layer_norm(x, r, w, b, 1e-5, x_bias=xb, backend="torch")
    assert torch.equal(s, r + (x + xb)) and torch.equal(y, F.layer_norm(s, (20,), w, b, 1e-5))
    for got, want in zip(add_layer_norm_ref(x, r, w, b, x_bias=xb), _torch(x, r, w, b, xb)):
        assert torch.equal(got, want)
    y, s = add_layer_norm_ref(x.half(), r.half(), w.half(), b.half(), x_bias=xb.half(), upcast=True)
    assert y.dtype == s.dtype == torch.float32
    # bf16 branch, fp32 stream and parameters: s is fp32, y still comes back in x's dtype
    y, s = add_layer_norm(x.bfloat16(), r, w, b, x_bias=xb, backend="torch")
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32
    # fp32 stream with bf16 parameters: F.layer_norm would refuse the mix; the parameters are cast
    y, s = add_layer_norm(x.bfloat16(), r, w.bfloat16(), b.bfloat16(), x_bias=xb.bfloat16(), backend="torch")
    assert y.dtype == torch.bfloat16 and s.dtype == torch.float32


@pytest.mark.parametrize("use_ds", [True, False])
def test_compile_fullgraph(seeded, use_ds):
    x, r, w, b, xb = _inputs((2, 9, 40), torch.float32)

    def step(x, r, w, b, xb):
        y, s = add_layer_norm(x, r, w, b, x_bias=xb, backend="triton")
        return (y * 1.5).sum() + ((s ** 2).sum() if use_ds else 0.0)

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(x, r, w, b, xb), (x, r, w, b, xb))
    want = torch.autograd.grad(step(x, r, w, b, xb), (x, r, w, b, xb))
    for g, t in zip(got, want):
        torch.testing.assert_close(g, t, **FP32_TOL)


def test_custom_op_registration(seeded):
    # Schema, fake (meta) impls, autograd registration and AOT dispatch of both ops.
    x, r, w, b, xb = _inputs((5, 24), torch.float32)
    torch.library.opcheck(_add_layer_norm_fwd_op, (x, r, w, b, xb, 1e-6))
    torch.library.opcheck(_add_layer_norm_fwd_op, (x, None, None, None, None, 1e-6))
    torch.library.opcheck(_add_layer_norm_fwd_op, (x.bfloat16(), r, w, b, xb, 1e-6))
    y, s, mean, rstd = _add_layer_norm_fwd_op(x.detach(), r.detach(), w.detach(), b.detach(), xb.detach(), 1e-6)
    dy, ds = torch.randn_like(y), torch.randn_like(s)
    bwd_utils = ("test_schema", "test_faketensor", "test_aot_dispatch_dynamic")
    f32, bf16 = torch.float32, torch.bfloat16
    for args in ((dy, ds, s, w.detach(), mean, rstd, f32, None, f32, f32),
                 (dy, None, s, None, mean, rstd, f32, None, None, None),
                 (dy.bfloat16(), ds, s, w.detach(), mean, rstd, bf16, f32, f32, None)):
        torch.library.opcheck(_add_layer_norm_bwd_op, args, test_utils=bwd_utils)


def test_bad_inputs_raise(seeded):
    x = torch.randn(4, 16)
    with pytest.raises(ValueError, match=r"residual must have x's shape \(4, 16\)"):
        add_layer_norm(x, torch.randn(16), None, None, backend="triton")
    with pytest.raises(ValueError, match="residual is on meta"):
        add_layer_norm(x, torch.randn(4, 16, device="meta"), None, None)
    with pytest.raises(ValueError, match=r"weight must have shape \(16,\)"):
        add_layer_norm(x, None, torch.ones(15), None, backend="triton")
    with pytest.raises(ValueError, match=r"bias must have shape \(16,\)"):
        add_layer_norm(x, x, torch.ones(16), torch.zeros(4, 4), backend="torch")
    with pytest.raises(ValueError, match=r"x_bias must have shape \(16,\)"):
        add_layer_norm(x, x, None, None, x_bias=torch.zeros(17))
    with pytest.raises(ValueError, match="x_bias is on meta"):
        add_layer_norm(x, x, None, None, x_bias=torch.zeros(16, device="meta"))
    with pytest.raises(ValueError, match="D >= 1"):
        add_layer_norm(torch.tensor(1.0), None, None, None)
    with pytest.raises(ValueError, match="D >= 1"):
        add_layer_norm(torch.randn(3, 0), None, None, None)
    with pytest.raises(ValueError, match="fp32/fp16/bf16 x"):
        add_layer_norm(x.double(), None, None, None, backend="triton")
    with pytest.raises(ValueError, match="fp32/fp16/bf16 residual"):
        add_layer_norm(x, x.double(), None, None, backend="triton")
    with pytest.raises(ValueError, match="D <= 16384"):
        add_layer_norm(torch.randn(1, 16385), None, None, None, backend="triton")


def test_unavailable_backends_raise(monkeypatch):
    x = torch.randn(2, 8)
    with pytest.raises(BackendUnavailableError, match="add_layer_norm"):
        add_layer_norm(x, x, None, None, backend="cuda")
    monkeypatch.delenv("TRITON_INTERPRET")
    with pytest.raises(BackendUnavailableError, match="needs a CUDA device"):
        add_layer_norm(x, x, None, None, backend="triton")


@pytest.mark.gpu
class TestOnGpu:
    @pytest.mark.parametrize("dtype", DTYPES, ids=str)
    @pytest.mark.parametrize("D", GPU_WIDTHS)
    def test_model_widths(self, seeded, D, dtype):
        # 3001 rows: ragged against every BLOCK_M and against the persistent backward's row groups.
        _check_against_ref(_inputs((3001, D), dtype, device="cuda"))

    @pytest.mark.parametrize("D", GPU_WIDTHS)
    def test_mae_shapes_bf16(self, seeded, D):
        # batch 256 x 197 tokens (decoder / WSP rows), fp32 master params; fp32 stream once, s unused once.
        _check_against_ref(_inputs((256, 197, D), torch.bfloat16, device="cuda", p_dtype=torch.float32))
        _check_against_ref(_inputs((256 * 197, D), torch.bfloat16, device="cuda", r_dtype=torch.float32,
                                   p_dtype=torch.float32), use_ds=False)

    @pytest.mark.parametrize("residual,x_bias,weight,bias", [(False, True, True, True), (True, False, True, False),
                                                             (True, True, False, False)])
    def test_optional_inputs(self, seeded, residual, x_bias, weight, bias):
        _check_against_ref(_inputs((4, 197, 768), torch.bfloat16, device="cuda", residual=residual, x_bias=x_bias,
                                   weight=weight, bias=bias))

    def test_backward_is_deterministic(self, seeded):
        args = _inputs((50_000, 1024), torch.bfloat16, device="cuda")
        dy, ds = _grads_in(args, True)
        first = _run(_ours, args, dy, ds)
        for _ in range(3):
            for a, c in zip(first, _run(_ours, args, dy, ds)):
                assert torch.equal(a, c)

    def test_torch_backend_under_autocast_returns_x_dtype(self, seeded):
        x, r, w, b, xb = _inputs((8, 50, 768), torch.bfloat16, device="cuda", p_dtype=torch.float32)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            y, s = _torch(x, r, w, b, xb)
        assert y.dtype == s.dtype == torch.bfloat16

    def test_compile_inductor(self, seeded):
        args = _inputs((8, 50, 1280), torch.bfloat16, device="cuda", r_dtype=torch.float32)

        def step(*args):
            y, s = add_layer_norm(*args[:4], x_bias=args[4], backend="triton")
            return (y.float() ** 2).mean() + s.mean()

        compiled = torch.compile(step, fullgraph=True)
        got = torch.autograd.grad(compiled(*args), args)
        want = torch.autograd.grad(step(*args), args)
        for g, t in zip(got, want):
            torch.testing.assert_close(g, t, atol=1e-3, rtol=1e-2)
