"""maws_kernels.nn.attend_varlen: every backend against attention on each sequence alone, forward
and every gradient, on ragged lengths (1, odd, longer than a Triton tile) and a loose max_seqlen."""
import pytest
import torch

from maws_kernels.attention import attention_ref
from maws_kernels.nn import attend_varlen

# The CPU tests here run Triton on CPU tensors (interpreted); the gpu-marked ones run compiled kernels.
pytestmark = pytest.mark.interpreter


def _per_sequence(q, k, v, lengths):
    outs, a = [], 0
    for n in lengths:
        qs, ks, vs = (t[a:a + n].transpose(0, 1).unsqueeze(0) for t in (q, k, v))  # (1, H, n, Dh)
        outs.append(attention_ref(qs, ks, vs, upcast=True)[0].transpose(0, 1))
        a += n
    return torch.cat(outs)


@pytest.mark.parametrize("backend", ["sdpa", "manual", "triton"])
@pytest.mark.parametrize("lengths,slack", [([1, 7, 33], 0), ([5], 3), ([2, 70, 1, 16], 9)])
def test_attend_varlen_matches_each_sequence_alone(backend, lengths, slack):
    g = torch.Generator().manual_seed(len(lengths) * 100 + slack)
    T, H, Dh = sum(lengths), 2, 16
    q, k, v = (torch.randn(T, H, Dh, generator=g, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    out = attend_varlen(q, k, v, cu, max(lengths) + slack, backend)
    ref = _per_sequence(q, k, v, lengths)
    torch.testing.assert_close(out, ref, atol=2e-5, rtol=1e-4)
    dout = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_grads = torch.autograd.grad(ref, (q, k, v), dout)
    for a, b in zip(grads, ref_grads):
        torch.testing.assert_close(a, b, atol=5e-5, rtol=1e-4)


def test_attend_varlen_rejects_an_unknown_backend():
    q = torch.randn(3, 1, 8)
    with pytest.raises(ValueError, match="unknown attention backend"):
        attend_varlen(q, q, q, torch.tensor([0, 3], dtype=torch.int32), 3, "flash")


def test_attend_varlen_xformers_needs_a_gpu():
    from maws_kernels import BackendUnavailableError

    q = torch.randn(3, 1, 8)
    with pytest.raises((BackendUnavailableError, ImportError)):
        attend_varlen(q, q, q, torch.tensor([0, 3], dtype=torch.int32), 3, "xformers")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["sdpa", "triton", "xformers"])
def test_attend_varlen_on_gpu(backend):
    if backend == "xformers":
        pytest.importorskip("xformers.ops")
    lengths = [1, 77, 3, 40]
    T, H, Dh = sum(lengths), 4, 64
    q, k, v = (torch.randn(T, H, Dh, device="cuda", dtype=torch.bfloat16, requires_grad=True) for _ in range(3))
    cu = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32, device="cuda")
    out = attend_varlen(q, k, v, cu, 80, backend)
    ref = _per_sequence(q.float(), k.float(), v.float(), lengths)
    torch.testing.assert_close(out.float(), ref, atol=2e-2, rtol=2e-2)
    out.float().sum().backward()
    assert all(t.grad is not None and torch.isfinite(t.grad).all() for t in (q, k, v))
