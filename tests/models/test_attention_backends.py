"""The attention switch every ViT block goes through (maws_kernels.nn.attend): every backend against
the others on the same inputs; unavailable ones say so and never fall back."""
import pytest
import torch

import maws_kernels as mk
from maws_fast.config import ATTN_BACKENDS
from maws_fast.models import VisionTransformer
from maws_kernels.nn import attend, available_attention_backends, check_attention_backend

CPU_BACKENDS = ["triton", "sdpa", "manual"]  # triton interpreted


@pytest.mark.interpreter
@pytest.mark.parametrize("N", [1, 17, 50])
def test_backends_agree(seeded, N):
    q, k, v = (torch.randn(2, 3, N, 32, requires_grad=True) for _ in range(3))
    g = torch.randn(2, 3, N, 32)
    ref = attend(q, k, v, "manual")
    ref_grads = torch.autograd.grad(ref, (q, k, v), g)
    for backend in CPU_BACKENDS:
        out = attend(q, k, v, backend)
        torch.testing.assert_close(out, ref, rtol=1e-5, atol=1e-5, msg=backend)
        for a, b in zip(torch.autograd.grad(out, (q, k, v), g), ref_grads):
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5, msg=backend)


@pytest.mark.interpreter
def test_vit_forward_and_backward_with_triton_attention(seeded):
    ref = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5,
                            attn_backend="manual")
    fused = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=5,
                              attn_backend="triton")
    fused.load_state_dict(ref.state_dict())
    x = torch.randn(2, 3, 32, 32)
    a, b = fused(x), ref(x)
    torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)
    pa = [p for p in fused.parameters() if p.requires_grad]
    pb = [p for p in ref.parameters() if p.requires_grad]
    for u, w in zip(torch.autograd.grad(a.square().sum(), pa), torch.autograd.grad(b.square().sum(), pb)):
        torch.testing.assert_close(u, w, rtol=1e-4, atol=1e-5)


def test_xformers_says_why_it_cannot_run_on_cpu():
    q = torch.randn(1, 2, 5, 32)
    with pytest.raises(mk.BackendUnavailableError, match="attention backend 'xformers' is unavailable"):
        attend(q, q, q, "xformers")


def test_names_and_defaults():
    assert set(ATTN_BACKENDS) == {"triton", "sdpa", "xformers", "manual"}
    assert ATTN_BACKENDS == mk.nn.ATTENTION_BACKENDS  # config keeps its own copy (no torch import)
    with pytest.raises(ValueError, match="unknown attention backend 'flash'"):
        check_attention_backend("flash")
    assert available_attention_backends("cpu") == ["sdpa", "manual"]  # the interpreter runs only when named


@pytest.mark.gpu
@pytest.mark.parametrize("N,D", [(50, 64), (65, 80), (197, 32), (257, 32), (1025, 64)])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_every_gpu_backend_agrees(N, D, dtype):
    """triton, sdpa and xformers (where installed) against the fp32 manual reference, fwd and bwd."""
    q, k, v = (torch.randn(4, 6, N, D, device="cuda", dtype=dtype, requires_grad=True) for _ in range(3))
    g = torch.randn_like(q)
    q32, k32, v32 = (t.detach().float().requires_grad_() for t in (q, k, v))
    ref = attend(q32, k32, v32, "manual")
    ref_grads = torch.autograd.grad(ref, (q32, k32, v32), g.float())
    low = attend(q, k, v, "manual")
    low_grads = torch.autograd.grad(low, (q, k, v), g)
    from tests.kernels.tolerance import assert_rule

    for backend in available_attention_backends("cuda"):
        out = attend(q, k, v, backend)
        assert_rule(out, ref, low, dtype, f"{backend} out")
        for name, a, r, lo in zip("qkv", torch.autograd.grad(out, (q, k, v), g), ref_grads, low_grads):
            assert_rule(a, r, lo, dtype, f"{backend} d{name}", atol=1e-2)
