"""maws_kernels.attention: the Triton flash attention (interpreted on CPU, compiled on GPU) against
the matmul-softmax reference -- output and every gradient, dense, strided and varlen -- plus the
custom-op registration and the input checks."""
import pytest
import torch

from maws_kernels import BackendUnavailableError
from maws_kernels.attention import (
    _attention_fwd_op,
    _attention_packed_bwd_op,
    _attention_packed_fwd_op,
    attention,
    attention_qkvpacked,
    attention_ref,
    attention_varlen,
    attention_varlen_ref,
)
from tests.kernels.tolerance import LOWP, assert_rule

# The CPU tests here run Triton on CPU tensors (interpreted); the gpu-marked ones run compiled kernels.
pytestmark = pytest.mark.interpreter

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
# Interpreter tiles are 16 x 16: N = 1 (one row), 17 (a one-row ragged tail), 50 / 65 (the MAE
# encoder at B/16 and H/14), 197 (the decoder / WSP, 13 tiles with a 5-row tail).
SEQ_LENS = [1, 17, 50, 65, 197]
HEAD_DIMS = [32, 64, 80]  # 80: padded to a 128-wide block with masked columns
FP32_TOL = dict(atol=1e-5, rtol=1e-4)
GPU_SEQ_LENS = [50, 65, 197, 257, 1025]
GPU_HEAD_DIMS = [32, 64, 80, 96, 128]


def _ours(q, k, v):
    return attention(q, k, v, backend="triton")


def _fwd_bwd(fn, leaves, do, *args):
    """[o, dq, dk, dv] of ``fn(*leaves, *args)`` for the upstream gradient ``do``."""
    o = fn(*leaves, *args)
    return [o, *torch.autograd.grad(o, leaves, do)]


def _leaves(shape, dtype, device="cpu"):
    return [torch.randn(shape, device=device, dtype=dtype).requires_grad_(True) for _ in range(3)]


def _check(ours_fn, ref_fn, leaves, do, *args, names=("o", "dq", "dk", "dv")):
    """Ours vs the reference: fp32 directly; fp16/bf16 by the 2x-of-torch rule against fp32 inputs."""
    dtype = leaves[0].dtype
    ours = _fwd_bwd(ours_fn, leaves, do, *args)
    assert ours[0].dtype == dtype and ours[0].shape == leaves[0].shape
    up = [t.detach().float().requires_grad_(True) for t in leaves]
    ref32 = _fwd_bwd(ref_fn, up, do.float(), *args)
    if dtype == torch.float32:
        for name, a, b in zip(names, ours, ref32):
            torch.testing.assert_close(a, b, **FP32_TOL, msg=lambda m: f"{name}: {m}")
        return
    lowp = [t.detach().clone().requires_grad_(True) for t in leaves]
    torch_lowp = _fwd_bwd(ref_fn, lowp, do, *args)
    for name, a, b, c in zip(names, ours, ref32, torch_lowp):
        assert a.dtype == dtype, name
        assert_rule(a, b, c, dtype, f"{name} {dtype}")


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", HEAD_DIMS)
@pytest.mark.parametrize("N", SEQ_LENS)
def test_matches_reference(seeded, N, D, dtype):
    # two heads on short sequences (head / batch offsets), one on the 13-tile N = 197
    shape = (1, 1, N, D) if N > 100 else (2, 1, N, D) if D != 64 else (1, 2, N, D)
    leaves = _leaves(shape, dtype)
    _check(_ours, attention_ref, leaves, torch.randn(shape, dtype=dtype))


def test_batches_heads_and_tiles_each_get_their_own_program(seeded):
    """The launch grid is 1-D, (batch, head, tile) decoded from one program id: with several batches,
    several heads and several Q and K/V tiles (the last one ragged), each lands on its own slice --
    output and every gradient. Under the interpreter a tile is 16 rows: 3 tiles x 6 (batch, head)."""
    shape = (2, 3, 37, 16)
    leaves = _leaves(shape, torch.float32)
    _check(_ours, attention_ref, leaves, torch.randn(shape))


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
def test_strided_qkv_like_the_vit(seeded, dtype):
    """q, k, v as (B, H, N, D) views of one packed (B, N, 3, H, D) qkv: every stride differs from
    a contiguous tensor; the gradient lands in the packed tensor."""
    B, N, H, D = 2, 33, 2, 32
    qkv = torch.randn(B, N, 3, H, D, dtype=dtype, requires_grad=True)
    do = torch.randn(B, H, N, D, dtype=dtype)

    def run(packed, fn):
        q, k, v = packed.permute(2, 0, 3, 1, 4).unbind(0)  # each (B, H, N, D), token stride 3 * H * D
        o = fn(q, k, v)
        return [o, torch.autograd.grad(o, packed, do.to(o.dtype))[0]]

    ours = run(qkv, _ours)
    ref32 = run(qkv.detach().float().requires_grad_(True), attention_ref)
    if dtype == torch.float32:
        for a, b in zip(ours, ref32):
            torch.testing.assert_close(a, b, **FP32_TOL)
    else:
        torch_lowp = run(qkv.detach().clone().requires_grad_(True), attention_ref)
        for name, a, b, c in zip(("o", "dqkv"), ours, ref32, torch_lowp):
            assert_rule(a, b, c, dtype, name)
    # the output is (B, N, H, D) in memory: the ViT's transpose + reshape after attention is free
    assert ours[0].transpose(1, 2).is_contiguous()


def _packed_ref(qkv):
    """attention_ref on the unpacked views, returned as (B, N, H, D)."""
    q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)
    return attention_ref(q, k, v).transpose(1, 2)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("N,H,D", [(1, 1, 32), (33, 2, 32), (50, 3, 64), (20, 2, 80)])
def test_qkvpacked_matches_reference_and_writes_one_packed_grad(seeded, N, H, D, dtype):
    qkv = torch.randn(2, N, 3, H, D, dtype=dtype, requires_grad=True)
    do = torch.randn(2, N, H, D, dtype=dtype)
    ours = _fwd_bwd(lambda t: attention_qkvpacked(t, backend="triton"), [qkv], do)
    assert ours[0].shape == (2, N, H, D) and ours[0].is_contiguous() and ours[1].is_contiguous()
    ref32 = _fwd_bwd(_packed_ref, [qkv.detach().float().requires_grad_(True)], do.float())
    if dtype == torch.float32:
        for name, a, b in zip(("o", "dqkv"), ours, ref32):
            torch.testing.assert_close(a, b, **FP32_TOL, msg=lambda m: f"{name}: {m}")
    else:
        torch_lowp = _fwd_bwd(_packed_ref, [qkv.detach().clone().requires_grad_(True)], do)
        for name, a, b, c in zip(("o", "dqkv"), ours, ref32, torch_lowp):
            assert_rule(a, b, c, dtype, f"{name} {dtype}")


def test_qkvpacked_equals_unpacked_kernel_and_the_torch_backend(seeded):
    # same kernels, different addressing: bitwise equal to attention() on the permuted views
    qkv = torch.randn(2, 19, 3, 2, 32, requires_grad=True)
    do = torch.randn(2, 19, 2, 32)
    packed = _fwd_bwd(lambda t: attention_qkvpacked(t, backend="triton"), [qkv], do)
    unpacked = _fwd_bwd(lambda t: attention(*t.permute(2, 0, 3, 1, 4).unbind(0), backend="triton").transpose(1, 2),
                        [qkv], do)
    for a, b in zip(packed, unpacked):
        assert torch.equal(a, b)
    torch.testing.assert_close(attention_qkvpacked(qkv, backend="torch"), packed[0], **FP32_TOL)
    # a qkv Linear's output (B, N, 3 * H * D) viewed as (B, N, 3, H, D), with a strided token dim
    wide = torch.randn(2, 19, 3 * 2 * 32 + 8)[..., :192].reshape(2, 19, 3, 2, 32)
    torch.testing.assert_close(attention_qkvpacked(wide, backend="triton"), _packed_ref(wide), **FP32_TOL)


def test_qkvpacked_custom_ops_and_compile(seeded):
    qkv = torch.randn(1, 9, 3, 2, 16)
    torch.library.opcheck(_attention_packed_fwd_op, (qkv, 0.25))
    o, lse = _attention_packed_fwd_op(qkv, 0.25)
    torch.library.opcheck(_attention_packed_bwd_op, (torch.randn_like(o), qkv, o, lse, 0.25),
                          test_utils=("test_schema", "test_faketensor", "test_aot_dispatch_dynamic"))
    leaf = qkv.clone().requires_grad_(True)

    def step(t):
        return (attention_qkvpacked(t, backend="triton") ** 2).sum()

    got = torch.autograd.grad(torch.compile(step, backend="aot_eager", fullgraph=True)(leaf), leaf)[0]
    torch.testing.assert_close(got, torch.autograd.grad(step(leaf), leaf)[0], atol=1e-6, rtol=1e-6)
    with pytest.raises(ValueError, match=r"\(B, N, 3, H, D\)"):
        attention_qkvpacked(torch.randn(1, 9, 2, 2, 16), backend="triton")


def test_non_unit_last_stride_and_strided_grad(seeded):
    B, H, N, D = 1, 2, 20, 32
    q, k, v = (torch.randn(B, H, D, N).transpose(-1, -2).requires_grad_(True) for _ in range(3))
    do = torch.randn(B, H, D, N).transpose(-1, -2)  # a non-contiguous upstream gradient too
    ours = _fwd_bwd(_ours, [q, k, v], do)
    ref = _fwd_bwd(attention_ref, [q, k, v], do)
    for a, b in zip(ours, ref):
        torch.testing.assert_close(a, b, **FP32_TOL)


def test_scale_and_logsumexp(seeded):
    B, H, N, D = 1, 2, 23, 32
    q, k, v = (torch.randn(B, H, N, D) for _ in range(3))
    o, lse = _attention_fwd_op(q, k, v, None, N, 0.3)
    torch.testing.assert_close(o, attention_ref(q, k, v, 0.3), **FP32_TOL)
    torch.testing.assert_close(lse, torch.logsumexp(0.3 * q @ k.transpose(-2, -1), dim=-1), **FP32_TOL)
    assert lse.dtype == torch.float32 and lse.shape == (B, H, N)


@pytest.mark.parametrize("dtype", DTYPES, ids=str)
@pytest.mark.parametrize("D", [32, 80])
def test_varlen_matches_per_sequence_reference(seeded, D, dtype):
    lens = [5, 1, 17, 40]  # a length-1 sequence, ragged tails, one longer than the rest
    cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32)
    T, H = sum(lens), 2
    leaves = _leaves((T, H, D), dtype)
    do = torch.randn(T, H, D, dtype=dtype)

    def ours(q, k, v, cu, max_seqlen):
        return attention_varlen(q, k, v, cu, max_seqlen, backend="triton")

    def ref(q, k, v, cu, max_seqlen):
        return attention_varlen_ref(q, k, v, cu)

    _check(ours, ref, leaves, do, cu, max(lens))


def test_varlen_torch_backend_and_one_sequence_equals_dense(seeded):
    N, H, D = 19, 2, 32
    q, k, v = (torch.randn(N, H, D) for _ in range(3))
    cu = torch.tensor([0, N], dtype=torch.int32)
    dense = attention_ref(*(t.transpose(0, 1)[None] for t in (q, k, v)))[0].transpose(0, 1)
    torch.testing.assert_close(attention_varlen(q, k, v, cu, N, backend="torch"), dense, **FP32_TOL)
    torch.testing.assert_close(attention_varlen(q, k, v, cu, N, backend="triton"), dense, **FP32_TOL)


def test_torch_backend_is_the_reference(seeded):
    q, k, v = (torch.randn(1, 2, 9, 16) for _ in range(3))
    assert torch.equal(attention(q, k, v, backend="torch"), attention_ref(q, k, v))
    assert torch.equal(attention(q, k, v), attention_ref(q, k, v))  # CPU default: the reference


def test_compile_fullgraph(seeded):
    shape = (1, 2, 21, 32)
    q, k, v = _leaves(shape, torch.float32)
    cu = torch.tensor([0, 3, 21], dtype=torch.int32)

    def step(q, k, v):
        dense = attention(q, k, v, backend="triton")
        packed = attention_varlen(q[0].transpose(0, 1), k[0].transpose(0, 1), v[0].transpose(0, 1), cu, 18,
                                  backend="triton")
        return (dense * dense).sum() + packed.sum()

    compiled = torch.compile(step, backend="aot_eager", fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v), (q, k, v))
    want = torch.autograd.grad(step(q, k, v), (q, k, v))
    for a, b in zip(got, want):
        torch.testing.assert_close(a, b, atol=1e-6, rtol=1e-6)


def test_bad_inputs_raise_value_error():
    q = torch.randn(1, 2, 8, 32)
    with pytest.raises(ValueError, match="same shape"):
        attention(q, q, torch.randn(1, 2, 9, 32), backend="triton")
    with pytest.raises(ValueError, match=r"\(B, H, N, D\)"):
        attention(q[0], q[0], q[0], backend="triton")
    with pytest.raises(ValueError, match="D <= 128"):
        big = torch.randn(1, 1, 4, 160)
        attention(big, big, big, backend="triton")
    with pytest.raises(ValueError, match="floating"):
        i = torch.ones(1, 2, 8, 32, dtype=torch.int32)
        attention(i, i, i)
    with pytest.raises(ValueError, match="share dtype"):
        attention(q, q.half(), q, backend="triton")
    with pytest.raises(ValueError, match="fp32/fp16/bf16"):
        d = q.double()
        attention(d, d, d, backend="triton")
    p = torch.randn(8, 2, 32)
    with pytest.raises(ValueError, match="int32"):
        attention_varlen(p, p, p, torch.tensor([0, 8]), 8, backend="triton")
    with pytest.raises(ValueError, match=r"\(T, H, D\)"):
        attention_varlen(q, q, q, torch.tensor([0, 8], dtype=torch.int32), 8)


def test_cuda_backend_is_unavailable():
    q = torch.randn(1, 1, 4, 16)
    with pytest.raises(BackendUnavailableError):
        attention(q, q, q, backend="cuda")
    with pytest.raises(BackendUnavailableError):
        attention_varlen(q[0], q[0], q[0], torch.tensor([0, 1], dtype=torch.int32), 1, backend="cuda")


@pytest.mark.gpu
class TestGPU:
    """Compiled kernels on real shapes (no interpreter slack in the tolerance rule)."""

    @pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
    @pytest.mark.parametrize("D", GPU_HEAD_DIMS)
    @pytest.mark.parametrize("N", GPU_SEQ_LENS)
    def test_matches_reference(self, seeded, N, D, dtype):
        shape = (2, 3, N, D)
        leaves = _leaves(shape, dtype, "cuda")
        if dtype == torch.float32:
            # fp32 on the GPU: our dots are IEEE; torch's matmul may use TF32 -- disable it for the ref
            torch.backends.cuda.matmul.allow_tf32 = False
        _check(_ours, attention_ref, leaves, torch.randn(shape, dtype=dtype, device="cuda"))

    @pytest.mark.parametrize("dtype", LOWP, ids=str)
    def test_varlen(self, seeded, dtype):
        lens = [1, 50, 197, 257, 1025, 64]
        cu = torch.tensor([0] + torch.tensor(lens).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
        leaves = _leaves((sum(lens), 4, 64), dtype, "cuda")
        do = torch.randn(sum(lens), 4, 64, dtype=dtype, device="cuda")
        _check(lambda q, k, v: attention_varlen(q, k, v, cu, max(lens), backend="triton"),
               lambda q, k, v: attention_varlen_ref(q, k, v, cu), leaves, do)

    @pytest.mark.parametrize("N,H,D", [(50, 12, 64), (197, 16, 32), (257, 16, 80)])
    def test_qkvpacked(self, seeded, N, H, D):
        qkv = torch.randn(8, N, 3, H, D, dtype=torch.bfloat16, device="cuda", requires_grad=True)
        do = torch.randn(8, N, H, D, dtype=torch.bfloat16, device="cuda")
        ours = _fwd_bwd(lambda t: attention_qkvpacked(t, backend="triton"), [qkv], do)
        ref32 = _fwd_bwd(_packed_ref, [qkv.detach().float().requires_grad_(True)], do.float())
        torch_lowp = _fwd_bwd(_packed_ref, [qkv.detach().clone().requires_grad_(True)], do)
        for name, a, b, c in zip(("o", "dqkv"), ours, ref32, torch_lowp):
            assert_rule(a, b, c, torch.bfloat16, name)

    def test_matches_sdpa_and_compiles_with_inductor(self, seeded):
        q, k, v = _leaves((4, 12, 197, 64), torch.bfloat16, "cuda")
        want = torch.nn.functional.scaled_dot_product_attention(q, k, v)
        step = torch.compile(lambda q, k, v: attention(q, k, v, backend="triton"), fullgraph=True)
        got = step(q, k, v)
        torch.testing.assert_close(got, want, atol=2e-2, rtol=2e-2)
        torch.autograd.grad(got.float().sum(), (q, k, v))
