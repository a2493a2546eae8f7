"""The LiT text tower (packed, CLS-pooled) and the LiT model: a caption's embedding is what it is
alone, whatever else is in the batch and however much padding follows; the locked image tower."""
import math

import pytest
import torch

from maws_fast.models.lit import LiT
from maws_fast.models.text import TextTransformer
from maws_fast.models.vit import VisionTransformer


def _captions(g, lengths, vocab=50, n=None):
    n = n or max(lengths)
    ids = torch.zeros(len(lengths), n, dtype=torch.int64)
    for i, L in enumerate(lengths):
        ids[i, :L] = torch.randint(3, vocab, (L,), generator=g)
        ids[i, 0], ids[i, L - 1] = 1, 2  # [CLS] ... [EOS]
    return ids


@pytest.mark.interpreter
@pytest.mark.parametrize("backend", ["sdpa", "manual", "triton"])
def test_a_caption_embeds_as_it_does_alone(backend):
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    tower = TextTransformer(50, 24, 32, 2, 4, attn_backend=backend)
    lengths = [2, 9, 17, 5]
    ids = _captions(g, lengths, n=20)  # padded past the longest caption too
    out = tower(ids)
    alone = torch.cat([tower(ids[i:i + 1, :L]) for i, L in enumerate(lengths)])
    torch.testing.assert_close(out, alone, atol=2e-5, rtol=1e-5)
    # every parameter's gradient: the batch's equals the sum of the captions' alone
    w = torch.randn(out.shape, generator=g)
    grads = torch.autograd.grad((out * w).sum(), list(tower.parameters()))
    alone_grads = torch.autograd.grad(sum((tower(ids[i:i + 1, :L]) * w[i]).sum() for i, L in enumerate(lengths)),
                                      list(tower.parameters()))
    for (name, _), a, b in zip(tower.named_parameters(), grads, alone_grads):
        torch.testing.assert_close(a, b, atol=3e-5, rtol=1e-4, msg=name)


def test_padding_ids_are_never_embedded():
    g = torch.Generator().manual_seed(1)
    tower = TextTransformer(50, 16, 32, 1, 2)
    ids = _captions(g, [4, 7], n=10)
    with torch.no_grad():
        before = tower(ids)
        tower.token_embedding.weight[0].fill_(1e3)  # the pad row: changing it changes nothing
        torch.testing.assert_close(tower(ids), before, atol=0, rtol=0)


def test_text_tower_errors():
    tower = TextTransformer(50, 8, 16, 1, 2)
    with pytest.raises(ValueError, match="exceed the tower's context_length 8"):
        tower(torch.ones(2, 9, dtype=torch.int64))
    with pytest.raises(ValueError, match="caption 1 has no token"):
        tower(torch.tensor([[1, 5, 2], [0, 0, 0]]))
    with pytest.raises(ValueError, match="int32 / int64"):
        tower(torch.ones(2, 3))
    with pytest.raises(ValueError, match="pad_id 60"):
        TextTransformer(50, 8, 16, 1, 2, pad_id=60)


def _lit():
    torch.manual_seed(0)
    vit = VisionTransformer(img_size=8, patch_size=4, in_chans=1, embed_dim=16, depth=1, num_heads=2)
    return LiT(vit, TextTransformer(30, 8, 16, 1, 2), 16, 16, 12)


def test_lit_locks_its_image_tower_and_clamps_the_scale():
    m = _lit().lock_vision()
    assert m.logit_scale.item() == pytest.approx(math.log(1 / 0.07))
    assert m.scale().item() == pytest.approx(1 / 0.07, rel=1e-6)
    m.train()
    assert not m.vision_encoder.training and m.text_encoder.training
    assert not any(p.requires_grad for p in m.vision_encoder.parameters())
    imgs = torch.randn(3, 1, 8, 8)
    ids = torch.tensor([[1, 4, 2, 0], [1, 5, 6, 2], [1, 2, 0, 0]])
    img, txt, scale = m(imgs, ids)
    assert img.shape == txt.shape == (3, 12)
    torch.testing.assert_close(img.norm(dim=1), torch.ones(3))
    torch.testing.assert_close(txt.norm(dim=1), torch.ones(3))
    (img @ txt.T * scale).sum().backward()
    assert all(p.grad is None for p in m.vision_encoder.parameters())
    assert m.vision_projection.grad is not None and m.text_projection.grad is not None
    assert m.logit_scale.grad is not None and m.logit_scale.grad.abs() > 0
    with torch.no_grad():
        m.logit_scale.fill_(5.0)  # exp(5) > 100: the value is clamped, the gradient passes straight through
    m.logit_scale.grad = None
    scale = m.scale()
    assert scale.item() == pytest.approx(100.0)
    (scale * 2).backward()
    assert m.logit_scale.grad.item() == pytest.approx(200.0)  # d(2 exp(c))/dc at the cap, as if unclamped


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["triton", "sdpa"])
def test_text_tower_and_a_lit_step_on_gpu(backend):
    import maws_kernels

    g = torch.Generator().manual_seed(3)
    torch.manual_seed(0)
    tower = TextTransformer(50, 40, 128, 2, 4, attn_backend=backend).cuda()
    lengths = [3, 40, 17, 1 + 1, 29, 8, 33, 12]
    ids = _captions(g, lengths, n=40).cuda()
    with torch.autocast("cuda", dtype=torch.bfloat16):
        out = tower(ids)
        alone = torch.cat([tower(ids[i:i + 1, :L]) for i, L in enumerate(lengths)])
    assert out.dtype == torch.bfloat16
    torch.testing.assert_close(out.float(), alone.float(), atol=3e-2, rtol=3e-2)
    m = _lit().cuda().lock_vision()
    m.text_encoder = tower
    m.text_projection = torch.nn.Parameter(torch.randn(128, 12, device="cuda") * 128 ** -0.5)
    feats = torch.randn(8, 16, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        img, txt = m.embed_image_features(feats), m.encode_texts(ids)
        loss = maws_kernels.contrastive_loss(img, txt, m.scale(), backend="triton")
    ref = maws_kernels.contrastive_loss_ref(img.float(), txt.float(), m.scale())
    torch.testing.assert_close(loss, ref, atol=2e-2, rtol=2e-2)
    loss.backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in tower.parameters())
