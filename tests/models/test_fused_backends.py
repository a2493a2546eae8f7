"""The models run the fused ops through the backend switch: a training step with the Triton
kernels (interpreted on CPU) matches the same step on the torch references."""
import copy

import pytest
import torch

import maws_kernels as mk
from maws_fast.models import MaskedAutoencoderViT, VisionTransformer
from maws_kernels.nn import LayerNorm, Mlp


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


@pytest.mark.interpreter
def test_mae_training_step_triton_matches_torch(seeded):
    ref = _mae()
    fused = copy.deepcopy(ref)
    fused.set_kernel_backend("triton")
    assert all(m.backend == "triton" for m in fused.modules() if isinstance(m, (LayerNorm, Mlp)))
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


@pytest.mark.interpreter
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


def _count_norm_calls(monkeypatch):
    """Count the norm ops maws_kernels.nn's LayerNorm calls (the names it looks up when it runs)."""
    calls = {"add_layer_norm": 0, "layer_norm": 0}
    for name in calls:
        real = getattr(mk.nn, name)

        def counted(*args, _real=real, _name=name, **kwargs):
            calls[_name] += 1
            return _real(*args, **kwargs)
        monkeypatch.setattr(mk.nn, name, counted)
    return calls


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["triton", "torch"])
def test_residual_adds_land_in_the_norms(backend, monkeypatch, seeded):
    """Fused: every residual add but the first block's input is inside a norm (per block: norm2, and
    norm1 of every block after the first; the final norm takes the last MLP output). Torch: none is."""
    model = _mae()  # encoder depth 2, decoder depth 1
    model.set_kernel_backend(backend)
    calls = _count_norm_calls(monkeypatch)
    model(torch.randn(2, 3, 32, 32), 0.75)[0].backward()
    if backend == "triton":
        # encoder: norm2, norm1 + norm2, final norm; decoder: norm2, final norm
        assert calls == {"add_layer_norm": 6, "layer_norm": 2}  # norm1 of each stack's first block
    else:
        assert calls == {"add_layer_norm": 0, "layer_norm": 8}


@pytest.mark.interpreter
def test_block_alone_returns_its_stream_on_both_paths(seeded):
    """A block called as before (one tensor in, one out) computes the same thing fused or not;
    with ``defer`` it hands back (stream, MLP output), whose sum is that output."""
    from maws_fast.models.vit import Block

    ref = Block(24, 4)
    fused = copy.deepcopy(ref)
    for m in fused.modules():
        if isinstance(m, (LayerNorm, Mlp)):
            m.backend = "triton"
    x, branch = torch.randn(2, 5, 24), torch.randn(2, 5, 24)
    want = ref(x + branch)
    torch.testing.assert_close(fused(x + branch), want, rtol=1e-5, atol=1e-5)
    s, m = fused(x, branch, True)
    torch.testing.assert_close(s + m, want, rtol=1e-5, atol=1e-5)
    s, none = ref(x, branch, True)
    assert none is None and torch.equal(s, want)


def test_model_backend_cuda_selects_twins_only_where_they_exist():
    from maws_fast.models.vit import op_backend

    assert op_backend("cuda", has_cuda_twin=True) == "cuda"
    assert op_backend("cuda", has_cuda_twin=False) is None  # LayerNorm / CE: best for the device
    assert op_backend("triton", has_cuda_twin=False) == "triton"
    assert op_backend(None, has_cuda_twin=True) is None


def test_model_backend_cuda_leaves_the_twinless_modules_at_their_best():
    """``model.kernel_backend`` keeps the model's choice (the MAE's patch gather and loss read it);
    its LayerNorms and MLPs get what that choice means for an op without a CUDA twin."""
    model = _mae()
    model.set_kernel_backend("cuda")
    assert model.kernel_backend == "cuda"
    modules = [m for m in model.modules() if isinstance(m, (LayerNorm, Mlp))]
    assert len(modules) == 3 * 3 + 2  # 3 blocks x (norm1, norm2, mlp), norm, decoder_norm
    assert all(m.backend is None for m in modules)
    model.set_kernel_backend("triton")
    assert all(m.backend == "triton" for m in modules)


def test_the_blocks_are_maws_kernels_nn_modules():
    """One family: the ViT's norms, attention and MLPs are maws_kernels.nn's (the norms with eps
    1e-6); the model's backend setters route to their ``backend``."""
    from maws_kernels.nn import Attention

    model = _mae()
    blk = model.decoder_blocks[0]
    assert type(blk.norm1) is LayerNorm and blk.norm1.eps == 1e-6 and type(model.decoder_norm) is LayerNorm
    assert type(blk.attn) is Attention and type(blk.mlp) is Mlp
    model.set_attn_backend("manual")
    assert all(m.backend == "manual" for m in model.modules() if isinstance(m, Attention))


def test_set_kernel_backend_rejects_unknown_names():
    with pytest.raises(ValueError, match="kernel backend 'tpu'"):
        _mae().set_kernel_backend("tpu")


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "cuda"])
def test_mae_step_on_gpu_matches_torch(backend):
    if backend == "cuda" and "cuda" not in mk.available_backends("masked_patchify", ("cuda",), "cuda"):
        pytest.skip("maws_kernels._C is not built (pip install --no-build-isolation -e ./kernels on a CUDA machine)")
    torch.manual_seed(0)
    ref = MaskedAutoencoderViT(img_size=224, patch_size=16, embed_dim=192, depth=2, num_heads=3, decoder_embed_dim=128,
                               decoder_depth=1, decoder_num_heads=4, norm_pix_loss=True, kernel_backend="torch").cuda()
    fused = copy.deepcopy(ref)
    fused.set_kernel_backend(backend)  # "cuda": patch gather + loss in csrc; LayerNorm uses its best (Triton)
    imgs = torch.randn(8, 3, 224, 224, device="cuda")
    noise = torch.rand(8, 196, device="cuda")
    l_ref, g_ref = _step(ref, lambda m: m(imgs, 0.75, noise=noise)[0])
    l_fused, g_fused = _step(fused, lambda m: m(imgs, 0.75, noise=noise)[0])
    torch.testing.assert_close(l_fused, l_ref, rtol=1e-5, atol=1e-6)
    for name in g_ref:
        torch.testing.assert_close(g_fused[name], g_ref[name], rtol=1e-3, atol=1e-5, msg=name)
    with torch.autocast("cuda", dtype=torch.bfloat16):  # the training precision: close, not equal
        a, b = fused(imgs, 0.75, noise=noise)[0], ref(imgs, 0.75, noise=noise)[0]
    assert abs(a.item() - b.item()) < 2e-2 * abs(b.item())
