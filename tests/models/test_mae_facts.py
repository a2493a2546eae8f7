"""Every fact of docs/ARCHITECTURE.md's "Facts the code must match" section, pinned by a test that fails
if the fact is broken. Independent re-statements of the official formulas live here, written
loop-by-loop, so a shared bug in a vectorised helper cannot hide."""
import math

import pytest
import torch

import maws_kernels
from maws_fast.config import model_preset
from maws_fast.models.mae import MaskedAutoencoderViT, random_masking
from maws_fast.models.pos_embed import sincos_2d


def tiny_mae(**kw) -> MaskedAutoencoderViT:
    args = dict(img_size=32, patch_size=8, in_chans=3, embed_dim=64, depth=2, num_heads=4,
                decoder_embed_dim=32, decoder_depth=1, decoder_num_heads=4, norm_pix_loss=True)
    args.update(kw)
    return MaskedAutoencoderViT(**args)


# --- patchify ---------------------------------------------------------------------------------
@pytest.mark.parametrize("C,H,W,p", [(3, 32, 32, 8), (1, 28, 28, 4), (3, 28, 42, 14), (2, 16, 48, 16)])
def test_patchify_order_is_row_col_channel(C, H, W, p):
    x = torch.randn(2, C, H, W)
    out = maws_kernels.patchify(x, p)
    gw = W // p
    assert out.shape == (2, (H // p) * gw, p * p * C)
    for n in range(2):
        for _ in range(20):
            i, j = torch.randint(H // p, ()).item(), torch.randint(gw, ()).item()
            r, q, c = torch.randint(p, ()).item(), torch.randint(p, ()).item(), torch.randint(C, ()).item()
            # element (r, q, c) of patch (i, j) sits at (r * p + q) * C + c: channel LAST
            assert out[n, i * gw + j, (r * p + q) * C + c] == x[n, c, i * p + r, j * p + q]


def test_patchify_is_not_conv_weight_order():
    x = torch.randn(1, 3, 16, 16)
    conv_order = x.reshape(1, 3, 1, 16, 1, 16).permute(0, 2, 4, 1, 3, 5).reshape(1, 1, -1)  # (c, p, q)
    assert not torch.equal(maws_kernels.patchify(x, 16), conv_order)


@pytest.mark.parametrize("C,H,W,p", [(3, 32, 32, 8), (1, 28, 28, 4), (3, 28, 42, 14)])
def test_unpatchify_inverts_patchify_exactly(C, H, W, p):
    x = torch.randn(3, C, H, W)
    y = maws_kernels.unpatchify(maws_kernels.patchify(x, p), p, C, grid=(H // p, W // p))
    assert torch.equal(x, y)


# --- masking ----------------------------------------------------------------------------------
@pytest.mark.parametrize("L,keep", [(196, 49), (256, 64), (49, 12), (50, 12)])
def test_len_keep_matches_official(L, keep):
    x = torch.randn(2, L, 8)
    x_masked, mask, ids_restore, ids_keep = random_masking(x, 0.75)
    assert x_masked.shape == (2, keep, 8) and ids_keep.shape == (2, keep)
    assert torch.equal(mask.sum(1), torch.full((2,), float(L - keep)))


def test_masking_keeps_smallest_noise_and_marks_removed_in_original_order():
    B, L, D = 3, 16, 5
    x = torch.randn(B, L, D)
    noise = torch.rand(B, L)
    x_masked, mask, ids_restore, ids_keep = random_masking(x, 0.75, noise=noise)
    for b in range(B):
        order = sorted(range(L), key=lambda i: noise[b, i].item())
        kept = order[:4]
        assert ids_keep[b].tolist() == kept
        for i in range(L):
            assert mask[b, i].item() == (0.0 if i in kept else 1.0)
        for k, i in enumerate(kept):
            assert torch.equal(x_masked[b, k], x[b, i])
    ids_shuffle = torch.argsort(noise, 1)
    assert torch.equal(torch.gather(ids_shuffle, 1, ids_restore), torch.arange(L).expand(B, L))


def test_noise_and_generator_make_masking_reproducible():
    model = tiny_mae().eval()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, model.patch_embed.num_patches)
    a, b = model(imgs, noise=noise), model(imgs, noise=noise)
    assert torch.equal(a[0], b[0]) and torch.equal(a[2], b[2])
    g1, g2 = torch.Generator().manual_seed(5), torch.Generator().manual_seed(5)
    assert torch.equal(model(imgs, generator=g1)[2], model(imgs, generator=g2)[2])


def test_pos_embed_added_before_masking_and_cls_after():
    """The kept tokens carry the pos-embed of their ORIGINAL position; cls carries row zero."""
    model = tiny_mae(depth=0)  # no blocks: encoder output = norm(tokens)
    model.norm = torch.nn.Identity()
    with torch.no_grad():
        model.pos_embed.normal_()
        model.cls_token.normal_()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    latent, mask, _ = model.forward_encoder(imgs, 0.75, noise=noise)
    tokens = model.patch_embed(imgs) + model.pos_embed[:, 1:]
    ids_keep = torch.argsort(noise, 1)[:, :4]
    expect = torch.gather(tokens, 1, ids_keep[..., None].expand(-1, -1, 64))
    # The encoder embeds only the kept patches with a GEMM instead of the conv: fp32 rounding only.
    torch.testing.assert_close(latent[:, 1:], expect, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(latent[:, 0], (model.cls_token + model.pos_embed[:, 0]).expand(2, 1, 64)[:, 0])


def test_kept_patch_embed_equals_official_embed_all_then_gather():
    """forward_encoder (masked_patchify + GEMM on K patches) == the official conv-all + gather order."""
    model = tiny_mae()
    imgs = torch.randn(3, 3, 32, 32)
    noise = torch.rand(3, 16)
    ours = model.forward_encoder(imgs, 0.75, noise=noise)
    official = model.forward_encoder_official(imgs, 0.75, noise=noise)
    torch.testing.assert_close(ours[0], official[0], rtol=1e-5, atol=1e-5)
    assert torch.equal(ours[1], official[1]) and torch.equal(ours[2], official[2])
    g = torch.randn_like(ours[0])
    params = [model.patch_embed.proj.weight, model.patch_embed.proj.bias, model.cls_token]
    for a, b in zip(torch.autograd.grad(ours[0], params, g), torch.autograd.grad(official[0], params, g)):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


# --- loss ---------------------------------------------------------------------------------------
def _official_loss_loop(pred, imgs, mask, p, eps=1e-6):
    """Per-patch loop over the official formula with an explicitly UNBIASED variance."""
    target = maws_kernels.patchify(imgs, p)
    B, L, P = target.shape
    num = 0.0
    for b in range(B):
        for i in range(L):
            t = target[b, i].double()
            mean = t.sum() / P
            var = ((t - mean) ** 2).sum() / (P - 1)
            tn = (t - mean) / math.sqrt(var + eps)
            num += mask[b, i].item() * ((pred[b, i].double() - tn) ** 2).mean().item()
    return num / mask.sum().item()


def test_norm_pix_loss_uses_unbiased_variance():
    p = 4
    imgs = torch.randn(2, 3, 16, 16)
    pred = torch.randn(2, 16, p * p * 3)
    mask = (torch.rand(2, 16) > 0.5).float()
    mask[0, 0] = 1.0
    got = maws_kernels.norm_pix_loss(pred, imgs, mask, p).item()
    assert got == pytest.approx(_official_loss_loop(pred, imgs, mask, p), rel=1e-5)
    # The biased (n) variance gives a measurably different value: the test can tell them apart.
    t = maws_kernels.patchify(imgs, p)
    tb = (t - t.mean(-1, keepdim=True)) / (t.var(-1, keepdim=True, unbiased=False) + 1e-6) ** 0.5
    biased = (((pred - tb) ** 2).mean(-1) * mask).sum() / mask.sum()
    assert abs(biased.item() - got) > 1e-4


def test_loss_counts_only_removed_patches():
    model = tiny_mae()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    loss, pred, mask = model(imgs, noise=noise)
    kept = mask == 0
    pred2 = pred.detach().clone()
    pred2[kept] += 10.0  # changes at kept patches must not matter
    assert model.forward_loss(imgs, pred2, mask).item() == pytest.approx(loss.item(), rel=1e-6)
    pred3 = pred.detach().clone()
    pred3[~kept] += 1.0
    assert model.forward_loss(imgs, pred3, mask).item() > loss.item() + 0.1


def test_plain_pixel_loss_when_norm_pix_off():
    model = tiny_mae(norm_pix_loss=False)
    imgs = torch.randn(2, 3, 32, 32)
    loss, pred, mask = model(imgs)
    target = model.patchify(imgs)
    expect = (((pred - target) ** 2).mean(-1) * mask).sum() / mask.sum()
    torch.testing.assert_close(loss, expect)


# --- 2D sin-cos pos-embed ---------------------------------------------------------------------
def _official_sincos_loop(D, g):
    """Re-statement of get_2d_sincos_pos_embed: first half encodes the WIDTH (column) index."""
    rows = [[0.0] * D]  # cls
    for r in range(g):
        for c in range(g):
            row = []
            for coord in (c, r):  # first half: column; second half: row
                d = D // 2
                omegas = [1.0 / 10000 ** (i / (d / 2.0)) for i in range(d // 2)]
                row += [math.sin(coord * w) for w in omegas] + [math.cos(coord * w) for w in omegas]
            rows.append(row)
    return torch.tensor(rows, dtype=torch.float64)


@pytest.mark.parametrize("D,g", [(16, 3), (64, 4), (768, 14)])
def test_sincos_layout_matches_official(D, g):
    torch.testing.assert_close(sincos_2d(D, g).double(), _official_sincos_loop(D, g), rtol=0, atol=1e-6)


def test_pos_embed_first_half_is_width_coordinate_and_frozen():
    model = tiny_mae()
    pe = model.pos_embed[0, 1:].reshape(4, 4, 64)  # (row, col, D)
    first, second = pe[..., :32], pe[..., 32:]
    assert torch.equal(first[0], first[3]) and not torch.equal(first[:, 0], first[:, 3])  # varies with col only
    assert torch.equal(second[:, 0], second[:, 3]) and not torch.equal(second[0], second[3])
    assert torch.all(model.pos_embed[0, 0] == 0) and torch.all(model.decoder_pos_embed[0, 0] == 0)
    assert not model.pos_embed.requires_grad and not model.decoder_pos_embed.requires_grad
    # w_0 = 1 -> channel 0 is sin(col), channel 16 (= D/4, the start of the cos quarter) is cos(col)
    torch.testing.assert_close(first[1, 2, 0], torch.tensor(math.sin(2.0)))
    torch.testing.assert_close(first[1, 2, 16], torch.tensor(math.cos(2.0)))


# --- init ------------------------------------------------------------------------------------------
def _xavier_bound(fan_out, fan_in):
    return math.sqrt(6.0 / (fan_in + fan_out))


def test_init_scheme():
    model = tiny_mae(embed_dim=128, decoder_embed_dim=64)
    w = model.patch_embed.proj.weight.view(128, -1)  # (out, in*p*p)
    bound = _xavier_bound(*w.shape)
    assert w.abs().max() <= bound and w.abs().max() > 0.95 * bound
    assert w.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.05)  # uniform(-a, a) std
    for tok in (model.cls_token, model.mask_token):
        assert tok.std().item() == pytest.approx(0.02, rel=0.35)
    n_linear = 0
    for name, m in model.named_modules():
        if isinstance(m, torch.nn.Linear):
            n_linear += 1
            b = _xavier_bound(*m.weight.shape)
            assert m.weight.abs().max() <= b and m.weight.abs().max() > 0.9 * b, name
            assert torch.all(m.bias == 0), name
        elif isinstance(m, torch.nn.LayerNorm):
            assert torch.all(m.weight == 1) and torch.all(m.bias == 0), name
            assert m.eps == 1e-6, name
    assert n_linear == 2 * 4 + 1 * 4 + 2  # blocks (qkv, proj, fc1, fc2), decoder_embed, decoder_pred


def test_blocks_use_exact_gelu_and_qkv_bias():
    model = tiny_mae()
    blk = model.blocks[0]
    assert blk.attn.qkv.bias is not None
    assert isinstance(blk.mlp.act, torch.nn.GELU) and blk.mlp.act.approximate == "none"


# --- official key layout ------------------------------------------------------------------------
def test_state_dict_keys_match_official_mae_vit_base():
    cfg = model_preset("vit_b16")
    model = MaskedAutoencoderViT(
        img_size=224, patch_size=16, in_chans=3, embed_dim=768, depth=cfg.depth, num_heads=12,
        decoder_embed_dim=512, decoder_depth=8, decoder_num_heads=16, mlp_ratio=4, norm_pix_loss=True,
    )
    sd = model.state_dict()
    block = ["norm1.weight", "norm1.bias", "attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias",
             "norm2.weight", "norm2.bias", "mlp.fc1.weight", "mlp.fc1.bias", "mlp.fc2.weight", "mlp.fc2.bias"]
    expect = ["cls_token", "pos_embed", "patch_embed.proj.weight", "patch_embed.proj.bias"]
    expect += [f"blocks.{i}.{k}" for i in range(12) for k in block]
    expect += ["norm.weight", "norm.bias", "mask_token", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias"]
    expect += [f"decoder_blocks.{i}.{k}" for i in range(8) for k in block]
    expect += ["decoder_norm.weight", "decoder_norm.bias", "decoder_pred.weight", "decoder_pred.bias"]
    assert sorted(sd) == sorted(expect)
    shapes = {"cls_token": (1, 1, 768), "pos_embed": (1, 197, 768), "patch_embed.proj.weight": (768, 3, 16, 16),
              "blocks.0.attn.qkv.weight": (2304, 768), "blocks.11.mlp.fc1.weight": (3072, 768),
              "mask_token": (1, 1, 512), "decoder_pos_embed": (1, 197, 512), "decoder_embed.weight": (512, 768),
              "decoder_blocks.7.mlp.fc2.weight": (512, 2048), "decoder_pred.weight": (768, 512)}
    for k, s in shapes.items():
        assert tuple(sd[k].shape) == s, k


def test_mask_is_fp32_even_for_a_bf16_model():
    """Official: mask = torch.ones([N, L]) (fp32). A bf16 mask would round mask.sum() (441 -> 440)."""
    x = torch.randn(3, 196, 8, dtype=torch.bfloat16)
    _, mask, _, _ = random_masking(x, 0.25)
    assert mask.dtype == torch.float32 and mask.sum().item() == 3 * 49


def test_decoder_unshuffles_tokens_to_original_positions():
    """With no decoder blocks, output i depends only on the token at ORIGINAL position i:
    the embedded latent of patch i if it was kept, else the mask token; plus its pos-embed."""
    model = tiny_mae(decoder_depth=0).eval()
    with torch.no_grad():
        model.mask_token.normal_()
    imgs = torch.randn(2, 3, 32, 32)
    noise = torch.rand(2, 16)
    with torch.no_grad():
        latent, mask, ids_restore = model.forward_encoder(imgs, 0.75, noise=noise)
        pred = model.forward_decoder(latent, ids_restore)
        kept = torch.argsort(noise, 1)[:, :4]
        emb = model.decoder_embed(latent)  # (B, 1+K, Dd)
        for b in range(2):
            for i in range(16):
                hits = (kept[b] == i).nonzero()
                tok = emb[b, 1 + hits[0, 0]] if len(hits) else model.mask_token[0, 0]
                expect = model.decoder_pred(model.decoder_norm(tok + model.decoder_pos_embed[0, 1 + i]))
                torch.testing.assert_close(pred[b, i], expect, rtol=1e-5, atol=1e-5)
                assert mask[b, i].item() == (0.0 if len(hits) else 1.0)


def test_official_helper_surface():
    model = tiny_mae()
    assert model.patch_embed.patch_size[0] == 8 and model.patch_embed.num_patches == 16
    before = model.blocks[0].attn.qkv.weight.clone()
    model.initialize_weights()
    assert not torch.equal(before, model.blocks[0].attn.qkv.weight)
    x = torch.randn(2, 16, 8)
    out = model.random_masking(x, 0.75, noise=torch.rand(2, 16))
    assert len(out) == 3 and out[0].shape == (2, 4, 8)
