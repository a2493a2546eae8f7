"""The models run the fused ops through the backend switch: a training step with the Triton
kernels (interpreted on CPU) matches the same step on the torch references."""
import copy

import pytest
import torch

import maws_kernels as mk
from maws_fast.models import MaskedAutoencoderViT, VisionTransformer
from maws_fast.models.vit import LayerNorm


def _mae():
    return MaskedAutoencoderViT(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, decoder_embed_dim=32,
                                decoder_depth=1, decoder_num_heads=4, norm_pix_loss=True, kernel_backend="torch")


def _step(model, loss_fn):
    # SGD, not Adam: Adam's first step is lr * sign(g), and some gradients are analytically zero
    # (the attention key bias), so rounding noise would flip signs and hide real differences.
    opt = torch.optim.SGD(model.parameters(), lr=0.1)
    loss = loss_fn(model)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    opt.step()
    return loss.detach(), grads


def test_mae_training_step_triton_matches_torch(seeded):
    ref = _mae()
    fused = copy.deepcopy(ref)
    fused.set_kernel_backend("triton")
    assert all(m.kernel_backend == "triton" for m in fused.modules() if isinstance(m, LayerNorm))
    imgs = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 16)
    l_ref, g_ref = _step(ref, lambda m: m(imgs, 0.75, noise=noise)[0])
    l_fused, g_fused = _step(fused, lambda m: m(imgs, 0.75, noise=noise)[0])
    torch.testing.assert_close(l_fused, l_ref, rtol=1e-5, atol=1e-6)
    assert g_ref.keys() == g_fused.keys() and "patch_embed.proj.weight" in g_ref
    for name in g_ref:
        torch.testing.assert_close(g_fused[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)
    for (name, a), b in zip(fused.named_parameters(), ref.parameters()):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6, msg=name)


def test_wsp_step_triton_matches_torch(seeded):
    ref = VisionTransformer(img_size=32, patch_size=8, embed_dim=48, depth=2, num_heads=4, num_classes=20,
                            pos_embed_learnable=True, kernel_backend="torch")
    fused = copy.deepcopy(ref)
    fused.set_kernel_backend("triton")
    imgs = torch.randn(4, 3, 32, 32)
    ids = torch.randint(0, 20, (4, 3))
    w = torch.full((4, 3), 1 / 3)
    l_ref, g_ref = _step(ref, lambda m: mk.soft_target_cross_entropy(m(imgs), mk.sparse_to_dense(ids, w, 20),
                                                                      backend="torch"))
    l_fused, g_fused = _step(fused, lambda m: mk.soft_target_cross_entropy(m(imgs), target_ids=ids, target_weights=w,
                                                                          backend="triton"))
    torch.testing.assert_close(l_fused, l_ref, rtol=1e-5, atol=1e-6)
    for name in g_ref:
        torch.testing.assert_close(g_fused[name], g_ref[name], rtol=1e-4, atol=1e-6, msg=name)


def test_set_kernel_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="kernel backend 'tpu'"):
        _mae().set_kernel_backend("tpu")
