"""maws_kernels: standalone import, backend selection, and the torch references the fused kernels
will be tested against (patch gather, norm-pix loss, soft-target cross-entropy)."""
import os
import subprocess
import sys

import pytest
import torch

import maws_kernels
from maws_kernels import BackendUnavailableError, resolve_backend


def test_imports_without_the_trainer():
    code = ("import sys, maws_kernels; bad = [m for m in sys.modules if m.startswith(('maws_fast', 'nvidia.dali', "
            "'torch.distributed.fsdp'))]; assert not bad, bad; print(maws_kernels.__version__)")
    res = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr


@pytest.mark.interpreter
def test_backend_selection_order(monkeypatch):
    monkeypatch.delenv("MAWS_KERNELS_BACKEND", raising=False)
    assert resolve_backend("op", None, ("torch",), "cpu") == "torch"
    assert resolve_backend("op", "torch", ("triton", "torch"), "cpu") == "torch"
    monkeypatch.setenv("MAWS_KERNELS_BACKEND", "torch")
    assert resolve_backend("op", None, ("triton", "torch"), "cpu") == "torch"
    monkeypatch.setenv("MAWS_KERNELS_BACKEND", "triton")  # the interpreter runs when asked for by name
    assert resolve_backend("op", None, ("triton", "torch"), "cpu") == "triton"


@pytest.mark.interpreter
def test_cpu_default_is_torch_even_under_the_interpreter(monkeypatch):
    """Interpreted Triton is a test tool (~1 ms per program): CPU picks the torch path unless asked."""
    monkeypatch.delenv("MAWS_KERNELS_BACKEND", raising=False)
    assert maws_kernels.available_backends("op", ("triton", "torch"), "cpu") == ["torch", "triton"]
    assert resolve_backend("op", None, ("triton", "cuda", "torch"), "cpu") == "torch"


def test_unavailable_backend_raises_never_falls_back(monkeypatch):
    monkeypatch.delenv("MAWS_KERNELS_BACKEND", raising=False)
    with pytest.raises(BackendUnavailableError, match="op has no 'triton' implementation yet"):
        resolve_backend("op", "triton", ("torch",), "cpu")
    with pytest.raises(BackendUnavailableError, match="'cuda' is unavailable"):
        resolve_backend("op", "cuda", ("cuda", "torch"), "cpu")
    with pytest.raises(ValueError, match="unknown backend 'tpu'"):
        resolve_backend("op", "tpu", ("torch",), "cpu")
    monkeypatch.setenv("MAWS_KERNELS_BACKEND", "bogus")
    with pytest.raises(ValueError, match="env MAWS_KERNELS_BACKEND"):
        maws_kernels.norm_pix_loss(torch.randn(1, 4, 48), torch.randn(1, 3, 8, 8), torch.ones(1, 4), 4)


@pytest.mark.parametrize("B,C,H,W,p,K", [(1, 3, 32, 32, 16, 1), (3, 3, 28, 42, 14, 2), (2, 1, 28, 28, 4, 12)])
def test_masked_patchify_ref_gathers_kept_patches(B, C, H, W, p, K):
    images = torch.randn(B, C, H, W)
    L = (H // p) * (W // p)
    ids_keep = torch.stack([torch.randperm(L)[:K] for _ in range(B)])
    out = maws_kernels.masked_patchify(images, ids_keep, p)
    full = maws_kernels.patchify(images, p)
    for b in range(B):
        for k in range(K):
            assert torch.equal(out[b, k], full[b, ids_keep[b, k]])


def test_norm_pix_loss_gradient_is_only_on_removed_patches():
    pred = torch.randn(2, 16, 48, requires_grad=True)
    mask = (torch.rand(2, 16) < 0.75).float()
    mask[:, 0] = 1
    mask[:, 1] = 0
    maws_kernels.norm_pix_loss(pred, torch.randn(2, 3, 16, 16), mask, 4).backward()
    kept = mask == 0
    assert torch.all(pred.grad[kept] == 0) and torch.all(pred.grad[~kept].abs().sum(-1) > 0)


def test_norm_pix_loss_bf16_upcast_close_to_fp32():
    pred = torch.randn(2, 16, 48)
    images = torch.randn(2, 3, 16, 16)
    mask = (torch.rand(2, 16) < 0.75).float()
    mask[:, 0] = 1
    ref = maws_kernels.norm_pix_loss_ref(pred, images, mask, 4)
    low = maws_kernels.norm_pix_loss_ref(pred.bfloat16(), images.bfloat16(), mask.bfloat16(), 4, upcast=True)
    assert low.dtype == torch.float32 and abs(low.item() - ref.item()) < 2e-2 * abs(ref.item())


@pytest.mark.parametrize("B,V", [(1, 14), (5, 1000), (3, 30011)])
def test_soft_target_cross_entropy_value_and_gradient(B, V):
    logits = torch.randn(B, V, dtype=torch.float64, requires_grad=True)
    tags = (torch.rand(B, V) < 3.0 / V).double()
    tags[:, 0] = 1
    targets = tags / tags.sum(-1, keepdim=True)
    loss = maws_kernels.soft_target_cross_entropy(logits, targets)
    expect = sum(-(targets[b] * torch.log(torch.softmax(logits[b], 0))).sum() for b in range(B)) / B
    torch.testing.assert_close(loss.double(), expect.detach(), rtol=1e-6, atol=1e-6)
    loss.backward()
    torch.testing.assert_close(logits.grad, (torch.softmax(logits.detach(), -1) - targets) / B, rtol=1e-6, atol=1e-6)
    with pytest.raises(ValueError, match="must match logits"):
        maws_kernels.soft_target_cross_entropy(logits, targets[:, :-1])


def test_env_is_what_conftest_chose():
    from conftest import INTERPRETED

    # conftest sets it before any kernel import, where CUDA is absent (tests/test_triton_mode.py holds the rule)
    assert INTERPRETED == (os.environ.get("TRITON_INTERPRET") == "1")
