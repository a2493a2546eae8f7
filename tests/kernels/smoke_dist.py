"""A smoke run of an installed maws_kernels, with nothing else of this repository importable.

CI runs it in a clean virtual environment that holds only torch and the maws-kernels wheel
(``scripts/check_kernels_dist.sh``: no trainer, no Triton); ``tests/kernels/test_distribution.py``
runs it in a subprocess with Triton blocked. It checks that every public op runs its torch path
forward and backward on CPU against its reference, that the modules, the optimizer and the timm
patch (where timm is installed) work, and, with ``--expect-no-triton``, that asking for the Triton
backend raises ``BackendUnavailableError`` naming the missing package.

Usage: python smoke_dist.py [--expect-no-triton]
"""
from __future__ import annotations

import sys


def _close(a, b, what: str, tol: float = 1e-5) -> None:
    import torch

    if not torch.allclose(a, b, atol=tol, rtol=tol):
        raise AssertionError(f"{what}: max |diff| {(a - b).abs().max().item():.3g}")


def _grads(fn, *inputs, frozen=()):
    leaves = [t.detach().clone().requires_grad_(i not in frozen) for i, t in enumerate(inputs)]
    out = fn(*leaves)
    out.float().square().sum().backward() if out.dim() else out.backward()
    return out.detach(), [t.grad for t in leaves if t.requires_grad]


def check_ops() -> list[str]:
    import torch

    import maws_kernels as mk

    g = torch.Generator().manual_seed(0)
    rand = lambda *s: torch.randn(*s, generator=g)  # noqa: E731
    done = []

    def same(name, fn, ref, *inputs, tol=1e-5, frozen=()):
        out, grads = _grads(fn, *inputs, frozen=frozen)
        rout, rgrads = _grads(ref, *inputs, frozen=frozen)
        _close(out, rout, name, tol)
        for i, (a, b) in enumerate(zip(grads, rgrads)):
            if a is None:
                raise AssertionError(f"{name}: input {i} got no gradient")
            _close(a, b, f"{name} grad {i}", tol)
        done.append(name)

    x, w, b = rand(3, 7, 24), rand(24), rand(24)
    same("layer_norm", lambda x, w, b: mk.layer_norm(x, w, b, 1e-6), lambda x, w, b: mk.layer_norm_ref(x, w, b, 1e-6),
         x, w, b)
    r = rand(3, 7, 24)
    same("add_layer_norm", lambda x, r, w, b: torch.cat([t.flatten() for t in mk.add_layer_norm(x, r, w, b, 1e-6)]),
         lambda x, r, w, b: torch.cat([t.flatten() for t in mk.add_layer_norm_ref(x, r, w, b, 1e-6)]), x, r, w, b)
    same("bias_gelu", mk.bias_gelu, mk.bias_gelu_ref, rand(5, 40), rand(40))
    q, k, v = rand(2, 3, 13, 16), rand(2, 3, 13, 16), rand(2, 3, 13, 16)
    same("attention", mk.attention, mk.attention_ref, q, k, v, tol=1e-4)
    logits, t = rand(6, 50), torch.softmax(rand(6, 50), -1)
    same("soft_target_cross_entropy", mk.soft_target_cross_entropy, mk.soft_target_cross_entropy_ref, logits, t,
         frozen=(1,))
    images = rand(2, 3, 16, 16)
    ids = torch.stack([torch.randperm(16, generator=g)[:5] for _ in range(2)])
    same("masked_patchify", lambda im: mk.masked_patchify(im, ids, 4), lambda im: mk.masked_patchify_ref(im, ids, 4),
         images)
    mask = (torch.rand(2, 16, generator=g) > 0.4).float()
    same("norm_pix_loss", lambda p, im: mk.norm_pix_loss(p, im, mask, 4), lambda p, im: mk.norm_pix_loss_ref(p, im, mask, 4),
         rand(2, 16, 48), images, frozen=(1,))
    same("contrastive_loss", lambda i, t, s: mk.contrastive_loss(i, t, s), lambda i, t, s: mk.contrastive_loss_ref(i, t, s),
         rand(9, 16), rand(9, 16), torch.tensor(3.0), tol=1e-4)
    p, grad, m, v2 = rand(300), rand(300), torch.zeros(300), torch.zeros(300)
    p2, m2, v3 = p.clone(), m.clone(), v2.clone()
    mk.fused_adamw_(p, grad, m, v2, step=1, lr=1e-2, weight_decay=0.05)
    mk.fused_adamw_ref(p2, grad, m2, v3, step=1, lr=1e-2, weight_decay=0.05)
    _close(p, p2, "fused_adamw_", 0)
    done.append("fused_adamw_")
    return done


def check_modules() -> list[str]:
    import torch
    import torch.nn.functional as F

    import maws_kernels as mk
    from maws_kernels import nn as mnn

    x = torch.randn(2, 9, 32)
    ln = mnn.LayerNorm(32, eps=1e-6)
    _close(ln(x), F.layer_norm(x, (32,), ln.weight, ln.bias, 1e-6), "nn.LayerNorm")
    y, s = mnn.AddLayerNorm(32)(x, x)
    _close(s, 2 * x, "nn.AddLayerNorm sum", 0)
    attn = mnn.Attention(32, 4)
    q, k, v = attn.qkv(x).reshape(2, 9, 3, 4, 8).permute(2, 0, 3, 1, 4)
    want = attn.proj(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(2, 9, 32))
    _close(attn(x), want, "nn.Attention")
    mlp = mnn.Mlp(32, 64)
    _close(mlp(x), mlp.fc2(F.gelu(mlp.fc1(x))), "nn.Mlp")
    net = torch.nn.Sequential(mnn.LayerNorm(32), mnn.Mlp(32, 64))
    ref = __import__("copy").deepcopy(net)
    opt = mk.FusedAdamW(net.parameters(), lr=1e-2)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, foreach=False)
    for _ in range(3):
        for n, o in ((net, opt), (ref, ref_opt)):
            o.zero_grad()
            n(x).square().mean().backward()
            o.step()
    for a, b in zip(net.parameters(), ref.parameters()):
        _close(a, b, "optim.FusedAdamW vs torch.optim.AdamW", 0)
    done = ["nn.LayerNorm", "nn.AddLayerNorm", "nn.Attention", "nn.Mlp", "optim.FusedAdamW"]
    try:
        import timm  # noqa: F401
    except Exception:  # not installed (or its torchvision does not load beside this torch): said in the output
        return done + ["patch_timm skipped: timm does not import here"]
    model = timm.models.vision_transformer.VisionTransformer(img_size=16, patch_size=8, embed_dim=32, depth=1,
                                                             num_heads=4, num_classes=3).eval()
    want = model(torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0)))
    mk.patch_timm(model)
    _close(model(torch.randn(1, 3, 16, 16, generator=torch.Generator().manual_seed(0))), want, "patch_timm")
    return done + ["patch_timm"]


def check_triton_missing() -> None:
    import torch

    import maws_kernels as mk

    x, w, b = torch.randn(2, 8), torch.ones(8), torch.zeros(8)
    try:
        mk.layer_norm(x, w, b, 1e-6, backend="triton")
    except mk.BackendUnavailableError as e:
        if "'triton' package" not in str(e):
            raise AssertionError(f"the error does not name the missing package: {e}") from None
    else:
        raise AssertionError("backend='triton' ran without triton installed")
    from maws_kernels.layer_norm import _layer_norm_fwd_kernel

    try:
        _layer_norm_fwd_kernel[(1,)]()
    except mk.BackendUnavailableError:
        pass
    else:
        raise AssertionError("a Triton kernel stand-in launched")


def main(argv: list[str]) -> int:
    expect_no_triton = "--expect-no-triton" in argv
    import maws_kernels as mk

    if "maws_fast" in sys.modules:
        raise AssertionError("importing maws_kernels imported maws_fast")
    has_triton = mk._backend.TRITON_ERROR is None
    if expect_no_triton and has_triton:
        raise AssertionError("triton imports here, but --expect-no-triton was given")
    done = check_ops() + check_modules()
    if not has_triton:
        check_triton_missing()
    print(f"maws_kernels {mk.__version__} smoke: ok ({', '.join(done)}; triton "
          f"{'present' if has_triton else 'absent: the triton backend raises'}; from {mk.__file__})")
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
