"""Every fused kernel once, forward and every gradient, against its torch reference on the GPU.

    python benchmarks/sanitize_kernels.py --json out.json          # compiled kernels vs references
    compute-sanitizer --tool memcheck  python benchmarks/sanitize_kernels.py --pin-attention
    compute-sanitizer --tool racecheck python benchmarks/sanitize_kernels.py --only cuda

It is the workload for compute-sanitizer and, on its own, the check that the compiled kernels agree
with their references (fp32 and bf16 / fp16). Shapes are real but small (ragged tails, patch 14 and
16) so a sanitizer run takes minutes, not hours. Each backend ("triton", and "cuda" where
maws_kernels._C is built) is exercised.

Each check prints one line (ok / FAIL, max error, scale) and, with ``--json``, becomes a row of a
file rewritten after every row, so a run killed half-way keeps what it checked. A section that
raises (a kernel that does not compile, an illegal address) is one FAIL row naming the error and the
next section runs. Exit 1 if any check failed.

``--only cuda``: only the CUDA C++ twins (racecheck: Triton kernels use shared memory through the
compiler's own barriers, which racecheck can misreport; the twins are ours). ``--pin-attention``:
each autotuned kernel launches the first config its prune allows per key (one candidate timed under
the sanitizer, not five), fp32 included.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import sys
import traceback

import torch

import maws_kernels as mk
from maws_kernels import tuning


class Checks:
    """The running record: printed lines, the JSON rows (rewritten atomically after each), ok."""

    def __init__(self, json_path: str | None):
        self.path, self.rows, self.ok = json_path, [], True

    def add(self, row: dict) -> bool:
        self.rows.append(row)
        self.ok &= row["ok"]
        if self.path:
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.rows, f, indent=1)
            os.replace(tmp, self.path)
        return row["ok"]

    def close(self, a, b, what, tol) -> bool:
        err = (a.double() - b.double()).abs().max().item()
        scale = b.double().abs().max().item() + 1e-12
        ok = bool(err <= tol * scale)  # a NaN compares False: it fails
        print(f"{'ok  ' if ok else 'FAIL'} {what}: max err {err:.3g} (scale {scale:.3g})", flush=True)
        return self.add({"check": what, "ok": ok, "max_err": err, "scale": scale, "rel_tol": tol})

    @contextlib.contextmanager
    def section(self, name: str):
        """A group of checks; an exception inside is one FAIL row and the run goes on."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - recorded, printed, and the exit code says so
            line = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
            print(f"FAIL {name}: raised {line}", flush=True)
            traceback.print_exc()
            self.add({"check": name, "ok": False, "error": line})


DTYPES = (torch.float32, torch.bfloat16)


def _tol(dtype) -> float:
    return 1e-6 if dtype == torch.float32 else 2e-2


def _grads(c, outs, ins, refs, gys, what, tol):
    """Every gradient of ``ins`` through ours vs through the reference, for the same upstream ``gys``."""
    got = torch.autograd.grad(outs, ins, gys)
    want = torch.autograd.grad(refs, ins, tuple(g.to(r.dtype) for g, r in zip(gys, refs)))
    for i, (a, b) in enumerate(zip(got, want)):
        c.close(a, b, f"{what} bwd d{i}", tol)


def _patch_and_loss(c, dev, backends):
    for dtype in DTYPES:
        for img, p in ((224, 16), (224, 14)):
            L = (img // p) ** 2
            x = torch.randn(3, 3, img, img, device=dev, dtype=dtype, requires_grad=True)
            ids = torch.argsort(torch.rand(3, L, device=dev), 1)[:, : L // 4]
            pred = torch.randn(3, L, p * p * 3, device=dev, dtype=dtype, requires_grad=True)
            mask = (torch.rand(3, L, device=dev) < 0.75).float()
            ref = mk.norm_pix_loss_ref(pred, x.detach(), mask, p, upcast=True)
            gref = torch.autograd.grad(ref, pred)[0]
            for be in backends:
                y = mk.masked_patchify(x, ids, p, backend=be)
                c.close(y, mk.masked_patchify_ref(x, ids, p), f"masked_patchify {be} {dtype} p{p}", 0)
                gy = torch.randn_like(y)  # not ones: a permuted gradient must show
                g = torch.autograd.grad(y, x, gy)[0]
                c.close(g, torch.autograd.grad(mk.masked_patchify_ref(x, ids, p), x, gy)[0],
                        f"masked_patchify bwd {be} {dtype} p{p}", 0)
                loss = mk.norm_pix_loss(pred, x.detach(), mask, p, backend=be)
                c.close(loss, ref, f"norm_pix_loss {be} {dtype} p{p}", _tol(dtype))
                c.close(torch.autograd.grad(loss, pred)[0], gref, f"norm_pix_loss bwd {be} {dtype} p{p}", _tol(dtype))


def _bias_gelu(c, dev):
    for dtype in DTYPES:
        for N in (2048, 3072, 5120):
            x = (torch.randn(197 * 3, N, device=dev) * 2).to(dtype).requires_grad_()
            bb = torch.randn(N, device=dev, requires_grad=True)  # fp32 bias, as under autocast
            y = mk.bias_gelu(x, bb, backend="triton")
            r = mk.bias_gelu_ref(x, bb, upcast=True)
            c.close(y, r, f"bias_gelu {dtype} N={N}", _tol(dtype))
            _grads(c, (y,), (x, bb), (r,), (torch.randn_like(y),), f"bias_gelu {dtype} N={N}", _tol(dtype) * 10)


def _norms(c, dev):
    for dtype in DTYPES:
        for D in (512, 768, 1280, 4096):
            x = torch.randn(197 * 3, D, device=dev, dtype=dtype, requires_grad=True)
            w, b = (torch.randn(D, device=dev, requires_grad=True) for _ in range(2))
            y = mk.layer_norm(x, w, b, 1e-6, backend="triton")
            r = mk.layer_norm_ref(x, w, b, 1e-6, upcast=True)
            c.close(y, r, f"layer_norm {dtype} D={D}", _tol(dtype))
            _grads(c, (y,), (x, w, b), (r,), (torch.randn_like(y),), f"layer_norm {dtype} D={D}", _tol(dtype) * 10)
        for D in (512, 768, 1024):
            x, res = (torch.randn(197 * 3, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
            w, b, xb = (torch.randn(D, device=dev, requires_grad=True) for _ in range(3))
            y, s = mk.add_layer_norm(x, res, w, b, 1e-6, x_bias=xb, backend="triton")
            ry, rs = mk.add_layer_norm_ref(x, res, w, b, 1e-6, x_bias=xb, upcast=True)
            c.close(y, ry, f"add_layer_norm y {dtype} D={D}", _tol(dtype))
            c.close(s, rs, f"add_layer_norm s {dtype} D={D}", _tol(dtype))
            _grads(c, (y, s), (x, res, w, b, xb), (ry, rs), (torch.randn_like(y), torch.randn_like(s)),
                   f"add_layer_norm {dtype} D={D}", _tol(dtype) * 10)


def _cross_entropy(c, dev):
    V = 30011
    for dtype in DTYPES:
        tol = _tol(dtype)
        logits = (torch.randn(67, V, device=dev) * 3).to(dtype).requires_grad_()
        ids = torch.randint(0, V, (67, 5), device=dev)
        wts = torch.full((67, 5), 0.2, device=dev)
        dense = mk.sparse_to_dense(ids, wts, V)
        ref = mk.soft_target_cross_entropy_ref(logits, dense.to(dtype))
        gref = torch.autograd.grad(ref, logits)[0]
        for kw in (dict(targets=dense.to(dtype)), dict(target_ids=ids, target_weights=wts)):
            form = "dense" if "targets" in kw else "sparse"
            loss = mk.soft_target_cross_entropy(logits, backend="triton", **kw)
            c.close(loss, ref, f"soft_target_ce {dtype} {form}", tol)
            c.close(torch.autograd.grad(loss, logits)[0], gref, f"soft_target_ce bwd {dtype} {form}", max(tol, 1e-5))
        feats = torch.randn(67, 768, device=dev, dtype=dtype, requires_grad=True)
        W = (torch.randn(V, 768, device=dev) * 0.03).to(dtype).requires_grad_()
        loss = mk.linear_soft_target_cross_entropy(feats, W, None, target_ids=ids, target_weights=wts, chunk_rows=16,
                                                   backend="triton")
        ref = mk.soft_target_cross_entropy_ref(feats.float() @ W.float().t(), dense)
        c.close(loss, ref, f"linear_soft_target_ce {dtype}", tol)
        _grads(c, (loss,), (feats, W), (ref,), (torch.ones((), device=dev),), f"linear_soft_target_ce {dtype}",
               max(tol, 1e-5) * 10)


def _contrastive(c, dev):
    for dtype in DTYPES:
        img = torch.nn.functional.normalize(torch.randn(300, 256, device=dev), dim=-1).to(dtype).requires_grad_()
        txt = torch.nn.functional.normalize(torch.randn(300, 256, device=dev), dim=-1).to(dtype).requires_grad_()
        scale = torch.tensor(2.659, device=dev).exp().requires_grad_()
        loss = mk.contrastive_loss(img, txt, scale, chunk_rows=64, backend="triton")
        ref = mk.contrastive_loss_ref(img, txt, scale)
        c.close(loss, ref, f"contrastive_loss {dtype}", _tol(dtype))
        _grads(c, (loss,), (img, txt, scale), (ref,), (torch.ones((), device=dev),), f"contrastive_loss {dtype}",
               max(_tol(dtype), 1e-5) * 10)


def _attention(c, dev):
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tol, gtol = (1e-4, 1e-4) if dtype == torch.float32 else (2e-2, 5e-2)
        for N, D in ((50, 64), (65, 80), (197, 32), (257, 128)):
            q, k, v = (torch.randn(2, 4, N, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
            out = mk.attention(q, k, v, backend="triton")
            ref = mk.attention_ref(q, k, v, upcast=True)
            c.close(out, ref, f"attention {dtype} N={N} D={D}", tol)
            _grads(c, (out,), (q, k, v), (ref,), (torch.randn_like(out),), f"attention {dtype} N={N} D={D}", gtol)
        lens = torch.tensor([0, 5, 6, 23, 73], device=dev, dtype=torch.int32)
        q, k, v = (torch.randn(73, 4, 64, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        out = mk.attention_varlen(q, k, v, lens, 50, backend="triton")
        ref = mk.attention_varlen_ref(q, k, v, lens, upcast=True)
        c.close(out, ref, f"attention_varlen {dtype}", tol)
        _grads(c, (out,), (q, k, v), (ref,), (torch.randn_like(out),), f"attention_varlen {dtype}", gtol)


def _adamw(c, dev):
    n = 1_000_003
    for gdt in DTYPES:
        p0 = torch.randn(n, device=dev)
        grads = torch.randn(n, device=dev).to(gdt)
        state = [p0.clone(), torch.zeros(n, device=dev), torch.zeros(n, device=dev)]
        ref_state = [p0.clone(), torch.zeros(n, device=dev), torch.zeros(n, device=dev)]
        copy = torch.empty(n, device=dev, dtype=torch.bfloat16)
        for step in (1, 2, 3):
            kw = dict(step=step, lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.05)
            mk.fused_adamw_(*state[:1], grads, *state[1:], model_copy=copy, backend="triton", **kw)
            mk.fused_adamw_ref(*ref_state[:1], grads, *ref_state[1:], **kw)
        c.close(state[0], ref_state[0], f"fused_adamw_ grad {gdt}", 1e-6)
        c.close(copy.float(), ref_state[0].bfloat16().float(), f"fused_adamw_ bf16 copy grad {gdt}", 1e-2)
    # The multi-tensor step (FusedAdamW): ragged sizes, one empty, chunks straddling tensor ends.
    shapes = [(768, 3, 16, 16), (1,), (0,), (2304, 768), (4099,), (7, 5)]
    for gdt in DTYPES:
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
                c.close(a, r, f"fused_adamw_multi_ tensor {i} grad {gdt}", 1e-6)
    # Views 4 bytes off a 16-byte boundary: the kernel's ALIGNED=False path (scalar loads).
    base = [torch.randn(70_001, device=dev) for _ in range(4)]
    ps, gs, ms, vs = ([b[1:70_001]] for b in base)
    vs[0].abs_()
    refs = [t.clone() for t in (ps[0], gs[0], ms[0], vs[0])]
    mk.fused_adamw_multi_(ps, gs, ms, vs, step=1, lr=1e-3, weight_decay=0.05, backend="triton")
    mk.fused_adamw_ref(refs[0], refs[1], refs[2], refs[3], step=1, lr=1e-3, weight_decay=0.05)
    c.close(ps[0], refs[0], "fused_adamw_multi_ unaligned views", 1e-6)


SECTIONS = ("patch", "bias_gelu", "norms", "cross_entropy", "contrastive", "attention", "adamw")


def _all(c, dev, chosen):
    patch_backends = [b for b in ("triton", "cuda") if b in mk.available_backends("masked_patchify", ("triton", "cuda"), dev)]
    runs = {"patch": lambda: _patch_and_loss(c, dev, patch_backends), "bias_gelu": lambda: _bias_gelu(c, dev),
            "norms": lambda: _norms(c, dev), "cross_entropy": lambda: _cross_entropy(c, dev),
            "contrastive": lambda: _contrastive(c, dev), "attention": lambda: _attention(c, dev),
            "adamw": lambda: _adamw(c, dev)}
    for name in chosen:
        with c.section(name):
            runs[name]()


def main(argv: list[str]) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("device", nargs="?", default="cuda", help="cuda, or cpu under TRITON_INTERPRET=1 (runs the script only)")
    p.add_argument("--json", default=None, help="write the rows here, rewritten after each")
    p.add_argument("--only", choices=("all", "cuda"), default="all", help="cuda: only the CUDA C++ twins")
    p.add_argument("--pin-attention", action="store_true",
                   help="each autotuned kernel runs the first config its prune allows (maws_kernels.tuning.pinned)")
    p.add_argument("--sections", default=None, help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    args = p.parse_args(argv)
    dev = args.device
    if dev == "cuda" and not torch.cuda.is_available():
        print("sanitize_kernels: needs a CUDA device (or pass cpu with TRITON_INTERPRET=1)", file=sys.stderr)
        return 2
    c = Checks(args.json)
    torch.manual_seed(0)
    pin = tuning.pinned() if args.pin_attention else contextlib.nullcontext([])
    with pin as pinned:
        for name in pinned:
            print(f"pinned to the first config its prune allows: {name}")
        if args.only == "cuda":
            if "cuda" not in mk.available_backends("masked_patchify", ("cuda",), dev):
                c.add({"check": "cuda twins", "ok": False, "error": "maws_kernels._C is not built"})
                print("FAIL cuda twins: maws_kernels._C is not built")
            else:
                with c.section("patch + norm_pix_loss (cuda)"):
                    _patch_and_loss(c, dev, ["cuda"])
        else:
            chosen = args.sections.split(",") if args.sections else list(SECTIONS)
            unknown = sorted(set(chosen) - set(SECTIONS))
            if unknown:
                p.error(f"unknown section(s) {unknown}; choose from {list(SECTIONS)}")
            _all(c, dev, chosen)
    if dev == "cuda":
        torch.cuda.synchronize()
    print("all kernels match their references" if c.ok else "SOME KERNELS DIFFER")
    return 0 if c.ok else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
