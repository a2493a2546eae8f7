"""maws_kernels.contrastive_loss: symmetric InfoNCE against the eager (open_clip) loss.

Every gradient (both towers' local rows, the gathered features, the logit scale), awkward sizes,
several chunks, a rank's offset into gathered features, bf16; on the Triton backend no allocation
as large as the (b, B) logits (torch's profiler records every CPU allocation).
"""
import pytest
import torch
import torch.nn.functional as F

import maws_kernels as mk

# The CPU tests here run Triton on CPU tensors (interpreted); the gpu-marked ones run compiled kernels.
pytestmark = pytest.mark.interpreter

BACKENDS = ("torch", "triton")


def _features(b, D, dtype=torch.float32):
    return F.normalize(torch.randn(b, D), dim=-1).to(dtype), F.normalize(torch.randn(b, D), dim=-1).to(dtype)


def _grads(fn, tensors):
    leaves = [t.detach().clone().requires_grad_() for t in tensors]
    loss = fn(*leaves)
    loss.backward()
    return loss.detach(), [t.grad for t in leaves]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("b,D,chunk", [(1, 16, None), (7, 40, 3), (33, 32, 8), (64, 24, None)])
def test_one_process_matches_eager(seeded, backend, b, D, chunk):
    img, txt = _features(b, D)
    scale = torch.tensor(14.3)
    ours = lambda i, t, s: mk.contrastive_loss(i, t, s, chunk_rows=chunk, backend=backend)  # noqa: E731
    ref = lambda i, t, s: mk.contrastive_loss_ref(i, t, s)  # noqa: E731
    (lo, go), (lr, gr) = _grads(ours, [img, txt, scale]), _grads(ref, [img, txt, scale])
    assert torch.allclose(lo, lr, rtol=1e-5, atol=1e-6), (lo, lr)
    for name, a, r in zip(("image", "text", "logit_scale"), go, gr):
        assert torch.allclose(a, r, rtol=1e-4, atol=1e-5 * r.abs().max().item()), (name, (a - r).abs().max())


@pytest.mark.parametrize("backend", BACKENDS)
def test_a_ranks_rows_against_gathered_features(seeded, backend):
    """Rank 2 of 4 with 5 rows each: its rows, the gathered 20, offset 10; gradients reach the gathered ones."""
    world, b, D = 4, 5, 24
    all_img, all_txt = _features(world * b, D)
    off = 2 * b
    scale = torch.tensor(30.0)

    def run(fn, i_all, t_all, s):
        return fn(i_all[off:off + b], t_all[off:off + b], s, all_image_features=i_all, all_text_features=t_all,
                  offset=off)

    ours = lambda i, t, s: run(lambda *a, **k: mk.contrastive_loss(*a, **k, chunk_rows=2, backend=backend), i, t, s)  # noqa: E731
    (lo, go), (lr, gr) = _grads(ours, [all_img, all_txt, scale]), _grads(
        lambda i, t, s: run(mk.contrastive_loss_ref, i, t, s), [all_img, all_txt, scale])
    assert torch.allclose(lo, lr, rtol=1e-5, atol=1e-6)
    for a, r in zip(go, gr):  # fp32 rounding of gradient elements near 0: error relative to the largest
        assert torch.allclose(a, r, rtol=1e-4, atol=1e-5 * r.abs().max().item()), (a - r).abs().max()


def test_bf16_features(seeded):
    img, txt = _features(17, 32, torch.bfloat16)
    scale = torch.tensor(20.0)
    (lo, go), (lr, gr) = (_grads(lambda i, t, s: mk.contrastive_loss(i, t, s, backend="triton", chunk_rows=5),
                                 [img, txt, scale]),
                          _grads(lambda i, t, s: mk.contrastive_loss_ref(i, t, s), [img, txt, scale]))
    assert torch.allclose(lo, lr, rtol=2e-2, atol=2e-2)
    for a, r in zip(go, gr):
        assert torch.allclose(a.float(), r.float(), rtol=5e-2, atol=5e-3), (a.float() - r.float()).abs().max()


def _largest_allocation(fn) -> int:
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        fn()
    # per op, with what the ops inside it allocate: an upper bound of any one allocation
    return max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)


def test_triton_never_holds_the_logits(seeded):
    b, D, chunk = 512, 16, 8  # logits 1 MiB; the O(B D) gradient buffers ~85 KB, a chunk 16 KB
    img, txt = (t.requires_grad_() for t in _features(b, D))
    scale = torch.tensor(10.0, requires_grad=True)
    logits_bytes = b * b * 4

    def ours():
        mk.contrastive_loss(img, txt, scale, chunk_rows=chunk, backend="triton").backward()

    def eager():
        mk.contrastive_loss_ref(img, txt, scale).backward()

    assert _largest_allocation(eager) >= logits_bytes  # the check sees the eager loss's logits
    largest = _largest_allocation(ours)
    assert largest < logits_bytes // 8, f"an allocation of {largest} bytes (the logits are {logits_bytes})"


def test_errors():
    img, txt = _features(4, 8)
    s = torch.tensor(1.0)
    with pytest.raises(ValueError, match="both be"):
        mk.contrastive_loss(img, txt[:, :4], s)
    with pytest.raises(ValueError, match="offset"):
        mk.contrastive_loss(img, txt, s, all_image_features=img, all_text_features=txt, offset=2)
    with pytest.raises(ValueError, match="same ranks"):
        mk.contrastive_loss(img, txt, s, all_image_features=torch.cat([img, img]), all_text_features=txt)
    with pytest.raises(ValueError, match="one-element tensor"):
        mk.contrastive_loss(img, txt, 14.0)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_matches_eager_and_holds_no_logits(dtype):
    """B = 4096 at D = 768 on the GPU: the value and every gradient match the eager loss, and the
    peak memory of forward + backward stays far below eager's two (B, B) fp32 logits."""
    torch.manual_seed(0)
    B, D = 4096, 768
    img = F.normalize(torch.randn(B, D, device="cuda"), dim=-1).to(dtype).requires_grad_()
    txt = F.normalize(torch.randn(B, D, device="cuda"), dim=-1).to(dtype).requires_grad_()
    scale = torch.tensor(20.0, device="cuda", requires_grad=True)
    ref = mk.contrastive_loss_ref(img.float(), txt.float(), scale)
    ref_grads = torch.autograd.grad(ref, (img, txt, scale))
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = mk.contrastive_loss(img, txt, scale, backend="triton", chunk_rows=512)
    grads = torch.autograd.grad(loss, (img, txt, scale))
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    tol = 2e-2 if dtype == torch.bfloat16 else 1e-4
    torch.testing.assert_close(loss, ref, atol=tol, rtol=tol)
    for a, r in zip(grads, ref_grads):
        torch.testing.assert_close(a.float(), r.float(), atol=tol, rtol=tol)
    # feature-sized tensors (the scaled copies, the gradients, fp32 at most) and two chunks of logits; the eager
    # loss holds two (B, B) fp32 logits and their gradients (256 MiB here)
    budget = 6 * B * D * 4 + 2 * 512 * B * 4
    assert budget < 2 * B * B * 4 and peak < budget, f"peak {peak / 2**20:.0f} MiB, budget {budget / 2**20:.0f} MiB"
