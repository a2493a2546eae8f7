"""Run every fused kernel once, forward and backward, on the GPU: the workload for compute-sanitizer.

    compute-sanitizer --tool memcheck  python benchmarks/sanitize_kernels.py
    compute-sanitizer --tool racecheck python benchmarks/sanitize_kernels.py

Shapes are real but small (ragged tails, patch 14 and 16, bf16 and fp32) so a sanitizer run
takes minutes, not hours. Each backend ("triton", and "cuda" where maws_kernels._C is built)
is exercised; the script exits non-zero if any result differs from its torch reference, so a
sanitizer run also checks the numbers.
"""
from __future__ import annotations

import sys

import torch

import maws_kernels as mk


def _close(a, b, what, tol):
    err = (a.double() - b.double()).abs().max().item()
    scale = b.double().abs().max().item() + 1e-12
    ok = err <= tol * scale
    print(f"{'ok  ' if ok else 'FAIL'} {what}: max err {err:.3g} (scale {scale:.3g})")
    return ok


def main(argv: list[str]) -> int:
    dev = argv[0] if argv else "cuda"  # "cpu" (with TRITON_INTERPRET=1) only checks that the script runs
    if dev == "cuda" and not torch.cuda.is_available():
        print("sanitize_kernels: needs a CUDA device (or pass cpu with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    ok = True
    torch.manual_seed(0)
    patch_backends = [b for b in ("triton", "cuda") if b in mk.available_backends("masked_patchify", ("triton", "cuda"), dev)]
    for dtype in (torch.float32, torch.bfloat16):
        tol = 1e-6 if dtype == torch.float32 else 2e-2
        for img, p in ((224, 16), (224, 14)):
            L = (img // p) ** 2
            x = torch.randn(3, 3, img, img, device=dev, dtype=dtype, requires_grad=True)
            ids = torch.argsort(torch.rand(3, L, device=dev), 1)[:, : L // 4]
            pred = torch.randn(3, L, p * p * 3, device=dev, dtype=dtype, requires_grad=True)
            mask = (torch.rand(3, L, device=dev) < 0.75).float()
            ref = mk.norm_pix_loss_ref(pred, x.detach(), mask, p, upcast=True)
            gref = torch.autograd.grad(ref, pred)[0]
            for be in patch_backends:
                y = mk.masked_patchify(x, ids, p, backend=be)
                ok &= _close(y, mk.masked_patchify_ref(x, ids, p), f"masked_patchify {be} {dtype} p{p}", 0)
                gy = torch.randn_like(y)  # not ones: a permuted gradient must show
                g = torch.autograd.grad(y, x, gy)[0]
                ok &= _close(g, torch.autograd.grad(mk.masked_patchify_ref(x, ids, p), x, gy)[0],
                             f"masked_patchify bwd {be} {dtype} p{p}", 0)
                loss = mk.norm_pix_loss(pred, x.detach(), mask, p, backend=be)
                ok &= _close(loss, ref, f"norm_pix_loss {be} {dtype} p{p}", tol)
                ok &= _close(torch.autograd.grad(loss, pred)[0], gref, f"norm_pix_loss bwd {be} {dtype} p{p}", tol)
        for N in (2048, 3072, 5120):
            x = (torch.randn(197 * 3, N, device=dev) * 2).to(dtype).requires_grad_()
            bb = torch.randn(N, device=dev, requires_grad=True)  # fp32 bias, as under autocast
            y = mk.bias_gelu(x, bb, backend="triton")
            r = mk.bias_gelu_ref(x, bb, upcast=True)
            ok &= _close(y, r, f"bias_gelu {dtype} N={N}", tol)
            gy = torch.randn_like(y)
            for a, c, n in zip(torch.autograd.grad(y, (x, bb), gy), torch.autograd.grad(r, (x, bb), gy.float()), "xb"):
                ok &= _close(a, c, f"bias_gelu bwd d{n} {dtype} N={N}", tol * 10)
        for D in (512, 768, 1280, 4096):
            x = torch.randn(197 * 3, D, device=dev, dtype=dtype, requires_grad=True)
            w = torch.randn(D, device=dev, requires_grad=True)
            b = torch.randn(D, device=dev, requires_grad=True)
            y = mk.layer_norm(x, w, b, 1e-6, backend="triton")
            r = mk.layer_norm_ref(x, w, b, 1e-6, upcast=True)
            ok &= _close(y, r, f"layer_norm {dtype} D={D}", tol)
            gy = torch.randn_like(y)
            for a, c, n in zip(torch.autograd.grad(y, (x, w, b), gy), torch.autograd.grad(r, (x, w, b), gy.float()),
                               "xwb"):
                ok &= _close(a, c, f"layer_norm bwd d{n} {dtype} D={D}", tol * 10)
        for D in (512, 768, 1024):
            x = torch.randn(197 * 3, D, device=dev, dtype=dtype, requires_grad=True)
            res = torch.randn(197 * 3, D, device=dev, dtype=dtype, requires_grad=True)
            w, b, xb = (torch.randn(D, device=dev, requires_grad=True) for _ in range(3))
            y, s = mk.add_layer_norm(x, res, w, b, 1e-6, x_bias=xb, backend="triton")
            ry, rs = mk.add_layer_norm_ref(x, res, w, b, 1e-6, x_bias=xb, upcast=True)
            ok &= _close(y, ry, f"add_layer_norm y {dtype} D={D}", tol)
            ok &= _close(s, rs, f"add_layer_norm s {dtype} D={D}", tol)
            gy, gs = torch.randn_like(y), torch.randn_like(s)
            ins = (x, res, w, b, xb)
            got = torch.autograd.grad((y, s), ins, (gy, gs))
            want = torch.autograd.grad((ry, rs), ins, (gy.to(ry.dtype), gs.to(rs.dtype)))
            for a, c, n in zip(got, want, ("x", "residual", "w", "b", "x_bias")):
                ok &= _close(a, c, f"add_layer_norm bwd d{n} {dtype} D={D}", tol * 10)
        V = 30011
        logits = (torch.randn(67, V, device=dev) * 3).to(dtype).requires_grad_()
        ids = torch.randint(0, V, (67, 5), device=dev)
        wts = torch.full((67, 5), 0.2, device=dev)
        dense = mk.sparse_to_dense(ids, wts, V)
        ref = mk.soft_target_cross_entropy_ref(logits, dense.to(dtype))
        gref = torch.autograd.grad(ref, logits)[0]
        for kw in (dict(targets=dense.to(dtype)), dict(target_ids=ids, target_weights=wts)):
            loss = mk.soft_target_cross_entropy(logits, backend="triton", **kw)
            ok &= _close(loss, ref, f"soft_target_ce {dtype} {'dense' if 'targets' in kw else 'sparse'}", tol)
            ok &= _close(torch.autograd.grad(loss, logits)[0], gref, f"soft_target_ce bwd {dtype}", max(tol, 1e-5))
        feats = torch.randn(67, 768, device=dev, dtype=dtype, requires_grad=True)
        W = (torch.randn(V, 768, device=dev) * 0.03).to(dtype).requires_grad_()
        loss = mk.linear_soft_target_cross_entropy(feats, W, None, target_ids=ids, target_weights=wts, chunk_rows=16,
                                                   backend="triton")
        ref = mk.soft_target_cross_entropy_ref(feats.float() @ W.float().t(), dense)
        ok &= _close(loss, ref, f"linear_soft_target_ce {dtype}", tol)
    for dtype in (torch.bfloat16, torch.float16):
        for N, D in ((50, 64), (65, 80), (197, 32), (257, 128)):
            q, k, v = (torch.randn(2, 4, N, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
            out = mk.attention(q, k, v, backend="triton")
            ref = mk.attention_ref(q, k, v, upcast=True)
            ok &= _close(out, ref, f"attention {dtype} N={N} D={D}", 2e-2)
            g = torch.randn_like(out)
            for name, a, r in zip("qkv", torch.autograd.grad(out, (q, k, v), g), torch.autograd.grad(ref, (q, k, v), g)):
                ok &= _close(a, r, f"attention bwd d{name} {dtype} N={N} D={D}", 5e-2)
        lens = torch.tensor([0, 5, 6, 23, 73], device=dev, dtype=torch.int32)
        q, k, v = (torch.randn(73, 4, 64, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        out = mk.attention_varlen(q, k, v, lens, 50, backend="triton")
        ok &= _close(out, mk.attention_varlen_ref(q, k, v, lens, upcast=True), f"attention_varlen {dtype}", 2e-2)
    n = 1_000_003
    for gdt in (torch.float32, torch.bfloat16):
        p0 = torch.randn(n, device=dev)
        grads = torch.randn(n, device=dev).to(gdt)
        state = [p0.clone(), torch.zeros(n, device=dev), torch.zeros(n, device=dev)]
        ref_state = [p0.clone(), torch.zeros(n, device=dev), torch.zeros(n, device=dev)]
        copy = torch.empty(n, device=dev, dtype=torch.bfloat16)
        for step in (1, 2, 3):
            kw = dict(step=step, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.05)
            mk.fused_adamw_(*state[:1], grads, *state[1:], model_copy=copy, backend="triton", **kw)
            mk.fused_adamw_ref(*ref_state[:1], grads, *ref_state[1:], **kw)
        ok &= _close(state[0], ref_state[0], f"fused_adamw_ grad {gdt}", 1e-6)
        ok &= _close(copy.float(), ref_state[0].bfloat16().float(), f"fused_adamw_ bf16 copy grad {gdt}", 1e-2)
    # The multi-tensor step (FusedAdamW): ragged sizes, one empty, chunks straddling tensor ends.
    shapes = [(768, 3, 16, 16), (1,), (0,), (2304, 768), (4099,), (7, 5)]
    for gdt in (torch.float32, torch.bfloat16):
        ps = [torch.randn(s, device=dev) for s in shapes]
        gs = [torch.randn(s, device=dev).to(gdt) for s in shapes]
        ms = [torch.zeros(s, device=dev) for s in shapes]
        vs = [torch.zeros(s, device=dev) for s in shapes]
        refs = [p.clone() for p in ps], [m.clone() for m in ms], [v.clone() for v in vs]
        for step in (1, 2):
            kw = dict(step=step, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.05)
            mk.fused_adamw_multi_(ps, gs, ms, vs, backend="triton", **kw)
            mk.fused_adamw_multi_(*refs[:1], gs, *refs[1:], backend="torch", **kw)
        for i, (a, r) in enumerate(zip(ps, refs[0])):
            if a.numel():
                ok &= _close(a, r, f"fused_adamw_multi_ tensor {i} grad {gdt}", 1e-6)
    # Views 4 bytes off a 16-byte boundary: the kernel's ALIGNED=False path (scalar loads).
    base = [torch.randn(70_001, device=dev) for _ in range(4)]
    ps, gs, ms, vs = ([b[1:70_001]] for b in base)
    vs[0].abs_()
    refs = [t.clone() for t in (ps[0], gs[0], ms[0], vs[0])]
    mk.fused_adamw_multi_(ps, gs, ms, vs, step=1, lr=1e-3, weight_decay=0.05, backend="triton")
    mk.fused_adamw_ref(refs[0], refs[1], refs[2], refs[3], step=1, lr=1e-3, weight_decay=0.05)
    ok &= _close(ps[0], refs[0], "fused_adamw_multi_ unaligned views", 1e-6)
    if dev == "cuda":
        torch.cuda.synchronize()
    print("all kernels match their references" if ok else "SOME KERNELS DIFFER")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
