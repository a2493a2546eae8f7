"""Every fused kernel once, forward and every gradient, against its torch reference, on this machine.

    python -m maws_kernels.selfcheck                     # the GPU if there is one, small shapes
    python -m maws_kernels.selfcheck cpu                 # no GPU: the Triton kernels under the interpreter
    python -m maws_kernels.selfcheck --size full --json rows.json    # the sanitizer's shapes

What runs: masked_patchify and norm_pix_loss, bias_gelu, layer_norm and add_layer_norm, the soft-target
cross-entropies (dense, sparse, fused linear), contrastive_loss, attention and attention_varlen, fused_adamw_
and fused_adamw_multi_, each forward and every gradient, fp32 and bf16 (attention also fp16), on each backend
that can run on the device (``triton``; ``cuda`` where ``maws_kernels._C`` is built; ``torch``), against its
``<op>_ref`` (upcast to fp32). Two sizes: ``small`` (a few thousand elements per tensor, ragged tails: seconds
on a GPU once compiled, about half a minute under the interpreter) and ``full`` (small training shapes:
patch 14 and 16 at 224, vocabulary 30011, head dims 32 to 128; the workload of
``benchmarks/sanitize_kernels.py`` and compute-sanitizer).

Without a CUDA device the Triton kernels run under Triton's interpreter on CPU tensors. It must be switched
on (``TRITON_INTERPRET=1``) before any kernel module is imported, so :func:`run_selfcheck` runs the checks
in a fresh Python with the variable set when this process has not (this checks the kernels' code, not their
GPU compile).

Each check prints one line (ok / FAIL, max error, scale) and is one row: ``{"check", "op", "backend", "ok",
"max_err", "scale", "rel_tol"}``, passing when ``max_err <= rel_tol * scale`` (scale: the reference's largest
magnitude). A section that raises (a kernel that does not compile, an illegal address) is one FAIL row
``{"check", "ok": false, "error"}`` and the next section runs; so is a backend asked for by name that cannot
run here. With a JSON path the rows are rewritten after every row, so a run killed half-way keeps what it
checked. The command exits 1 if any check failed, 2 on a usage error.
"""
from __future__ import annotations

import argparse
import contextlib
import json
import os
import subprocess
import sys
import tempfile
import traceback
import types
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Iterable

import torch

import maws_kernels as mk
from maws_kernels import _backend, tuning
from maws_kernels._backend import BACKENDS, TRITON_ERROR, backend_problem

SECTIONS = ("patch", "bias_gelu", "norms", "cross_entropy", "contrastive", "attention", "adamw")
DTYPES = (torch.float32, torch.bfloat16)


@dataclass(frozen=True)
class Shapes:
    """The shapes one size checks at. Every section runs fp32 and bf16 (attention also fp16)."""

    batch: int                                # images of the patch ops
    patch: tuple[tuple[int, int], ...]        # (image side, patch size)
    rows: int                                 # token rows of bias_gelu and the norms
    gelu_widths: tuple[int, ...]              # bias_gelu's N
    norm_widths: tuple[int, ...]              # layer_norm's D
    add_norm_widths: tuple[int, ...]          # add_layer_norm's D
    ce: tuple[int, int, int, int]             # (rows, vocabulary, feature width, chunk rows) of the CEs
    contrastive: tuple[int, int, int]         # (pairs, width, chunk rows)
    attention: tuple[tuple[int, int], ...]    # (N, head dim)
    attention_bh: tuple[int, int]             # (batch, heads)
    varlen: tuple[int, ...]                   # cu_seqlens of attention_varlen (4 heads of 64)
    adamw_numel: int                          # fused_adamw_'s flat shard
    adamw_shapes: tuple[tuple[int, ...], ...]  # fused_adamw_multi_'s tensors: ragged, one empty
    adamw_unaligned: int                      # a view 4 bytes off a 16-byte boundary


SIZES = {
    # Under the interpreter each program costs ~1 ms: small keeps every launch to a few dozen programs
    # while keeping what breaks kernels: ragged tails, a head dim that is not a power of two, an empty tensor.
    "small": Shapes(batch=2, patch=((48, 16), (42, 14)), rows=13, gelu_widths=(200,), norm_widths=(200,),
                    add_norm_widths=(136,), ce=(7, 1009, 48, 4), contrastive=(20, 32, 8),
                    attention=((37, 64), (21, 80)), attention_bh=(1, 2), varlen=(0, 3, 4, 20),
                    adamw_numel=10_007, adamw_shapes=((8, 3, 4, 4), (1,), (0,), (64, 48), (1031,), (7, 5)),
                    adamw_unaligned=7_001),
    "full": Shapes(batch=3, patch=((224, 16), (224, 14)), rows=197 * 3, gelu_widths=(2048, 3072, 5120),
                   norm_widths=(512, 768, 1280, 4096), add_norm_widths=(512, 768, 1024), ce=(67, 30011, 768, 16),
                   contrastive=(300, 256, 64), attention=((50, 64), (65, 80), (197, 32), (257, 128)),
                   attention_bh=(2, 4), varlen=(0, 5, 6, 23, 73), adamw_numel=1_000_003,
                   adamw_shapes=((768, 3, 16, 16), (1,), (0,), (2304, 768), (4099,), (7, 5)),
                   adamw_unaligned=70_001),
}


class Checks:
    """The running record of one run: its shapes and backends, the printed lines, the JSON rows (rewritten
    atomically after each), and whether every check so far passed."""

    def __init__(self, json_path: str | None, shapes: Shapes = SIZES["full"], backends: Iterable[str] = ("triton",),
                 echo: Callable[[str], None] | None = print):
        self.path, self.rows, self.ok = json_path, [], True
        self.shapes, self.backends = shapes, tuple(backends)
        self.echo = echo or (lambda line: None)

    def of(self, *implemented: str) -> list[str]:
        """This run's backends that an op implements, in this run's order."""
        return [b for b in self.backends if b in implemented]

    def add(self, row: dict) -> bool:
        self.rows.append(row)
        self.ok &= row["ok"]
        if self.path:
            tmp = f"{self.path}.tmp"
            with open(tmp, "w") as f:
                json.dump(self.rows, f, indent=1)
            os.replace(tmp, self.path)
        return row["ok"]

    def close(self, a, b, what, tol, op: str | None = None, backend: str | None = None) -> bool:
        """One check: ``a`` (ours) against ``b`` (the reference) within ``tol`` times b's largest magnitude."""
        err = (a.double() - b.double()).abs().max().item() if b.numel() else 0.0
        scale = (b.double().abs().max().item() if b.numel() else 0.0) + 1e-12
        ok = bool(err <= tol * scale)  # a NaN compares False: it fails
        self.echo(f"{'ok  ' if ok else 'FAIL'} {what}: max err {err:.3g} (scale {scale:.3g})")
        return self.add({"check": what, "op": op, "backend": backend, "ok": ok, "max_err": err, "scale": scale,
                         "rel_tol": tol})

    @contextlib.contextmanager
    def section(self, name: str):
        """A group of checks; an exception inside is one FAIL row and the run goes on."""
        try:
            yield
        except Exception as e:  # noqa: BLE001 - recorded, printed, and the exit code says so
            line = f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"[:500]
            self.echo(f"FAIL {name}: raised {line}")
            traceback.print_exc()
            self.add({"check": name, "ok": False, "error": line})


def _tol(dtype) -> float:
    return 1e-6 if dtype == torch.float32 else 2e-2


def _named(op: str, be: str) -> str:
    """A row's op label: the Triton rows keep the sanitizer's names (no backend), the others name theirs."""
    return op if be == "triton" else f"{op} {be}"


def _grads(c, outs, ins, refs, gys, what, tol, op=None, be=None):
    """Every gradient of ``ins`` through ours vs through the reference, for the same upstream ``gys``. The
    reference's graph is kept: the next backend's gradients are checked against it too."""
    got = torch.autograd.grad(outs, ins, gys)
    want = torch.autograd.grad(refs, ins, tuple(g.to(r.dtype) for g, r in zip(gys, refs)), retain_graph=True)
    for i, (a, b) in enumerate(zip(got, want)):
        c.close(a, b, f"{what} bwd d{i}", tol, op, be)


# --- the sections: each op's forward and gradients, per dtype, shape and backend --------------------------
def _patch_and_loss(c, dev, backends):
    for dtype in DTYPES:
        for img, p in c.shapes.patch:
            B, L = c.shapes.batch, (img // p) ** 2
            x = torch.randn(B, 3, img, img, device=dev, dtype=dtype, requires_grad=True)
            ids = torch.argsort(torch.rand(B, L, device=dev), 1)[:, : L // 4]
            pred = torch.randn(B, L, p * p * 3, device=dev, dtype=dtype, requires_grad=True)
            mask = (torch.rand(B, L, device=dev) < 0.75).float()
            ref = mk.norm_pix_loss_ref(pred, x.detach(), mask, p, upcast=True)
            gref = torch.autograd.grad(ref, pred)[0]
            for be in backends:
                y = mk.masked_patchify(x, ids, p, backend=be)
                c.close(y, mk.masked_patchify_ref(x, ids, p), f"masked_patchify {be} {dtype} p{p}", 0,
                        "masked_patchify", be)
                gy = torch.randn_like(y)  # not ones: a permuted gradient must show
                g = torch.autograd.grad(y, x, gy)[0]
                c.close(g, torch.autograd.grad(mk.masked_patchify_ref(x, ids, p), x, gy)[0],
                        f"masked_patchify bwd {be} {dtype} p{p}", 0, "masked_patchify", be)
                loss = mk.norm_pix_loss(pred, x.detach(), mask, p, backend=be)
                c.close(loss, ref, f"norm_pix_loss {be} {dtype} p{p}", _tol(dtype), "norm_pix_loss", be)
                c.close(torch.autograd.grad(loss, pred)[0], gref, f"norm_pix_loss bwd {be} {dtype} p{p}", _tol(dtype),
                        "norm_pix_loss", be)


def _bias_gelu(c, dev):
    for dtype in DTYPES:
        for N in c.shapes.gelu_widths:
            x = (torch.randn(c.shapes.rows, N, device=dev) * 2).to(dtype).requires_grad_()
            bb = torch.randn(N, device=dev, requires_grad=True)  # fp32 bias, as under autocast
            r = mk.bias_gelu_ref(x, bb, upcast=True)
            for be in c.of("triton", "torch"):
                y = mk.bias_gelu(x, bb, backend=be)
                what = f"{_named('bias_gelu', be)} {dtype} N={N}"
                c.close(y, r, what, _tol(dtype), "bias_gelu", be)
                _grads(c, (y,), (x, bb), (r,), (torch.randn_like(y),), what, _tol(dtype) * 10, "bias_gelu", be)


def _norms(c, dev):
    rows = c.shapes.rows
    for dtype in DTYPES:
        for D in c.shapes.norm_widths:
            x = torch.randn(rows, D, device=dev, dtype=dtype, requires_grad=True)
            w, b = (torch.randn(D, device=dev, requires_grad=True) for _ in range(2))
            r = mk.layer_norm_ref(x, w, b, 1e-6, upcast=True)
            for be in c.of("triton", "torch"):
                y = mk.layer_norm(x, w, b, 1e-6, backend=be)
                what = f"{_named('layer_norm', be)} {dtype} D={D}"
                c.close(y, r, what, _tol(dtype), "layer_norm", be)
                _grads(c, (y,), (x, w, b), (r,), (torch.randn_like(y),), what, _tol(dtype) * 10, "layer_norm", be)
        for D in c.shapes.add_norm_widths:
            x, res = (torch.randn(rows, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(2))
            w, b, xb = (torch.randn(D, device=dev, requires_grad=True) for _ in range(3))
            ry, rs = mk.add_layer_norm_ref(x, res, w, b, 1e-6, x_bias=xb, upcast=True)
            for be in c.of("triton", "torch"):
                y, s = mk.add_layer_norm(x, res, w, b, 1e-6, x_bias=xb, backend=be)
                op = _named("add_layer_norm", be)
                c.close(y, ry, f"{op} y {dtype} D={D}", _tol(dtype), "add_layer_norm", be)
                c.close(s, rs, f"{op} s {dtype} D={D}", _tol(dtype), "add_layer_norm", be)
                _grads(c, (y, s), (x, res, w, b, xb), (ry, rs), (torch.randn_like(y), torch.randn_like(s)),
                       f"{op} {dtype} D={D}", _tol(dtype) * 10, "add_layer_norm", be)


def _cross_entropy(c, dev):
    rows, V, width, chunk = c.shapes.ce
    for dtype in DTYPES:
        tol = _tol(dtype)
        logits = (torch.randn(rows, V, device=dev) * 3).to(dtype).requires_grad_()
        ids = torch.randint(0, V, (rows, 5), device=dev)
        wts = torch.full((rows, 5), 0.2, device=dev)
        dense = mk.sparse_to_dense(ids, wts, V)
        ref = mk.soft_target_cross_entropy_ref(logits, dense.to(dtype))
        gref = torch.autograd.grad(ref, logits)[0]
        feats = torch.randn(rows, width, device=dev, dtype=dtype, requires_grad=True)
        W = (torch.randn(V, width, device=dev) * 0.03).to(dtype).requires_grad_()
        lref = mk.soft_target_cross_entropy_ref(feats.float() @ W.float().t(), dense)
        for be in c.of("triton", "torch"):
            op = _named("soft_target_ce", be)
            for kw in (dict(targets=dense.to(dtype)), dict(target_ids=ids, target_weights=wts)):
                form = "dense" if "targets" in kw else "sparse"
                loss = mk.soft_target_cross_entropy(logits, backend=be, **kw)
                c.close(loss, ref, f"{op} {dtype} {form}", tol, "soft_target_cross_entropy", be)
                c.close(torch.autograd.grad(loss, logits)[0], gref, f"{op} bwd {dtype} {form}", max(tol, 1e-5),
                        "soft_target_cross_entropy", be)
            loss = mk.linear_soft_target_cross_entropy(feats, W, None, target_ids=ids, target_weights=wts,
                                                       chunk_rows=chunk, backend=be)
            what = f"{_named('linear_soft_target_ce', be)} {dtype}"
            c.close(loss, lref, what, tol, "linear_soft_target_cross_entropy", be)
            _grads(c, (loss,), (feats, W), (lref,), (torch.ones((), device=dev),), what, max(tol, 1e-5) * 10,
                   "linear_soft_target_cross_entropy", be)


def _contrastive(c, dev):
    pairs, width, chunk = c.shapes.contrastive
    for dtype in DTYPES:
        img = torch.nn.functional.normalize(torch.randn(pairs, width, device=dev), dim=-1).to(dtype).requires_grad_()
        txt = torch.nn.functional.normalize(torch.randn(pairs, width, device=dev), dim=-1).to(dtype).requires_grad_()
        scale = torch.tensor(2.659, device=dev).exp().requires_grad_()
        ref = mk.contrastive_loss_ref(img, txt, scale)
        for be in c.of("triton", "torch"):
            loss = mk.contrastive_loss(img, txt, scale, chunk_rows=chunk, backend=be)
            what = f"{_named('contrastive_loss', be)} {dtype}"
            c.close(loss, ref, what, _tol(dtype), "contrastive_loss", be)
            _grads(c, (loss,), (img, txt, scale), (ref,), (torch.ones((), device=dev),), what,
                   max(_tol(dtype), 1e-5) * 10, "contrastive_loss", be)


def _attention(c, dev):
    B, H = c.shapes.attention_bh
    cu = c.shapes.varlen
    for dtype in (torch.float32, torch.bfloat16, torch.float16):
        tol, gtol = (1e-4, 1e-4) if dtype == torch.float32 else (2e-2, 5e-2)
        for N, D in c.shapes.attention:
            q, k, v = (torch.randn(B, H, N, D, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
            ref = mk.attention_ref(q, k, v, upcast=True)
            for be in c.of("triton", "torch"):
                out = mk.attention(q, k, v, backend=be)
                what = f"{_named('attention', be)} {dtype} N={N} D={D}"
                c.close(out, ref, what, tol, "attention", be)
                _grads(c, (out,), (q, k, v), (ref,), (torch.randn_like(out),), what, gtol, "attention", be)
        lens = torch.tensor(cu, device=dev, dtype=torch.int32)
        max_len = max(b - a for a, b in zip(cu, cu[1:]))
        q, k, v = (torch.randn(cu[-1], 4, 64, device=dev, dtype=dtype, requires_grad=True) for _ in range(3))
        ref = mk.attention_varlen_ref(q, k, v, lens, upcast=True)
        for be in c.of("triton", "torch"):
            out = mk.attention_varlen(q, k, v, lens, max_len, backend=be)
            what = f"{_named('attention_varlen', be)} {dtype}"
            c.close(out, ref, what, tol, "attention_varlen", be)
            _grads(c, (out,), (q, k, v), (ref,), (torch.randn_like(out),), what, gtol, "attention_varlen", be)


def _adamw(c, dev):
    n = c.shapes.adamw_numel
    kw1 = dict(lr=1e-3, beta1=0.9, beta2=0.95, eps=1e-8, weight_decay=0.05)
    for be in c.of("triton", "torch"):
        for gdt in DTYPES:
            p0 = torch.randn(n, device=dev)
            grads = torch.randn(n, device=dev).to(gdt)
            state = [p0.clone(), torch.zeros(n, device=dev), torch.zeros(n, device=dev)]
            ref_state = [p0.clone(), torch.zeros(n, device=dev), torch.zeros(n, device=dev)]
            copy = torch.empty(n, device=dev, dtype=torch.bfloat16)
            for step in (1, 2, 3):
                mk.fused_adamw_(*state[:1], grads, *state[1:], model_copy=copy, backend=be, step=step, **kw1)
                mk.fused_adamw_ref(*ref_state[:1], grads, *ref_state[1:], step=step, **kw1)
            op = _named("fused_adamw_", be)
            c.close(state[0], ref_state[0], f"{op} grad {gdt}", 1e-6, "fused_adamw_", be)
            c.close(copy.float(), ref_state[0].bfloat16().float(), f"{op} bf16 copy grad {gdt}", 1e-2, "fused_adamw_",
                    be)
        # The multi-tensor step (FusedAdamW): ragged sizes, one empty, chunks straddling tensor ends; its
        # reference is fused_adamw_ref on each tensor.
        op = _named("fused_adamw_multi_", be)
        for gdt in DTYPES:
            shapes = c.shapes.adamw_shapes
            ps = [torch.randn(s, device=dev) for s in shapes]
            gs = [torch.randn(s, device=dev).to(gdt) for s in shapes]
            ms = [torch.zeros(s, device=dev) for s in shapes]
            vs = [torch.zeros(s, device=dev) for s in shapes]
            refs = [p.clone() for p in ps], [m.clone() for m in ms], [v.clone() for v in vs]
            for step in (1, 2):
                mk.fused_adamw_multi_(ps, gs, ms, vs, backend=be, step=step, **kw1)
                for p, g, m, v in zip(refs[0], gs, refs[1], refs[2]):
                    mk.fused_adamw_ref(p.view(-1), g.view(-1), m.view(-1), v.view(-1), step=step, **kw1)
            for i, (a, r) in enumerate(zip(ps, refs[0])):
                if a.numel():
                    c.close(a, r, f"{op} tensor {i} grad {gdt}", 1e-6, "fused_adamw_multi_", be)
        # Views 4 bytes off a 16-byte boundary: the kernel's ALIGNED=False path (scalar loads).
        m = c.shapes.adamw_unaligned
        base = [torch.randn(m, device=dev) for _ in range(4)]
        ps, gs, ms, vs = ([b[1:m]] for b in base)
        vs[0].abs_()
        refs = [t.clone() for t in (ps[0], gs[0], ms[0], vs[0])]
        mk.fused_adamw_multi_(ps, gs, ms, vs, step=1, lr=1e-3, weight_decay=0.05, backend=be)
        mk.fused_adamw_ref(refs[0], refs[1], refs[2], refs[3], step=1, lr=1e-3, weight_decay=0.05)
        c.close(ps[0], refs[0], f"{op} unaligned views", 1e-6, "fused_adamw_multi_", be)


# --- running them ---------------------------------------------------------------------------------------
def _run_sections(c: Checks, dev: str, chosen: Iterable[str], impl) -> None:
    """Run the ``chosen`` sections. ``impl`` is where the section functions are looked up: this module, or
    ``benchmarks/sanitize_kernels.py``, which re-exports them (so its tests can stand one in)."""
    runs = {"patch": lambda: impl._patch_and_loss(c, dev, c.of("triton", "cuda", "torch")),
            "bias_gelu": lambda: impl._bias_gelu(c, dev), "norms": lambda: impl._norms(c, dev),
            "cross_entropy": lambda: impl._cross_entropy(c, dev), "contrastive": lambda: impl._contrastive(c, dev),
            "attention": lambda: impl._attention(c, dev), "adamw": lambda: impl._adamw(c, dev)}
    for name in chosen:
        run_section = runs[name]  # looked up first: `runs[name]()` would read as a kernel launch to the grid scan
        with c.section(name):
            run_section()


def _this_module() -> types.SimpleNamespace:
    """This module's names (also when it runs as ``__main__``, whose module object may be another)."""
    return types.SimpleNamespace(**globals())


def usable_backends(device: str | torch.device) -> list[str]:
    """The kernel backends that can run on ``device`` in this process (see :func:`maws_kernels.backend_problem`)."""
    return [b for b in BACKENDS if backend_problem(b, device) is None]


def _check_args(device: str, size: str, backends, sections) -> None:
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; choose one of {tuple(SIZES)}")
    unknown = sorted(set(sections or ()) - set(SECTIONS)) + sorted(set(backends or ()) - set(BACKENDS))
    if unknown:
        raise ValueError(f"unknown section(s) or backend(s) {unknown}; sections: {list(SECTIONS)}, "
                         f"backends: {list(BACKENDS)}")
    torch.device(device)  # raises on a malformed device string


def run_checks(device: str = "cuda", *, size: str = "small", backends: Iterable[str] | None = None,
               sections: Iterable[str] | None = None, json_path: str | None = None, pin: bool = False,
               echo: Callable[[str], None] | None = print, impl=None) -> list[dict]:
    """Run the checks in this process and return their rows (see the module docstring).

    Triton kernels on a CPU device need ``TRITON_INTERPRET=1`` set before maws_kernels was imported; use
    :func:`run_selfcheck`, which starts a fresh Python for that.

    Args:
        device: where the tensors live ("cuda", "cuda:1", "cpu").
        size: "small" or "full" (:data:`SIZES`).
        backends: the backends to check; None: every backend that can run on ``device`` here. One asked for
            by name that cannot run is a FAIL row saying why.
        sections: a subset of :data:`SECTIONS` (default: all), run in the order given.
        json_path: rewrite the rows there (atomically) after every row.
        pin: each autotuned kernel launches only the first config its prune allows per key (one compile per
            key instead of a search: a check of correctness, not of speed).
        echo: receives each printed line (None: silent).
        impl: where the section functions are looked up (default: this module).

    Raises:
        ValueError: an unknown size, section, backend or device string.
    """
    _check_args(device, size, backends, sections)
    chosen = list(sections) if sections is not None else list(SECTIONS)
    usable = usable_backends(device)
    wanted = list(backends) if backends is not None else usable
    c = Checks(json_path, SIZES[size], [b for b in wanted if b in usable], echo)
    for b in wanted:
        if b not in usable:
            why = backend_problem(b, device)
            c.echo(f"FAIL {b} backend: cannot run here: {why}")
            c.add({"check": f"{b} backend", "ok": False, "error": why})
    torch.manual_seed(0)
    with (tuning.pinned() if pin else contextlib.nullcontext([])) as pinned:
        if pinned:
            c.echo(f"autotuned kernels pinned to the first config their prune allows: {', '.join(pinned)}")
        _run_sections(c, device, chosen, impl or _this_module())
    if torch.device(device).type == "cuda":
        with c.section("cuda synchronize"):  # an asynchronous kernel error surfaces here, as a row
            torch.cuda.synchronize()
    return c.rows


@dataclass
class SelfCheck:
    """What :func:`run_selfcheck` found: the rows, whether the Triton kernels ran under the interpreter, and
    a note on how they ran (None when there is nothing to say)."""

    rows: list[dict] = field(default_factory=list)
    interpreted: bool = False
    note: str | None = None

    @property
    def ok(self) -> bool:
        return bool(self.rows) and all(r["ok"] for r in self.rows)


def how_it_runs(device: str | torch.device) -> tuple[bool, bool, str | None]:
    """(in a fresh Python?, Triton interpreted?, a note for the user) for checks on ``device`` from here."""
    dev = torch.device(device)
    interpreting = os.environ.get("TRITON_INTERPRET") == "1"
    if TRITON_ERROR is not None:
        return False, False, f"Triton cannot be imported ({TRITON_ERROR}): its kernels are not checked"
    if interpreting:
        return False, True, ("TRITON_INTERPRET=1: Triton kernels checked under the interpreter"
                             " — this checks the code, not the GPU compile")
    if dev.type == "cuda":
        return False, False, None
    why = "no CUDA device" if not torch.cuda.is_available() else f"device {dev}"
    return True, True, (f"{why}: Triton kernels checked under the interpreter on CPU"
                        " — this checks the code, not the GPU compile")


def run_selfcheck(device: str = "cuda", *, size: str = "small", backends: Iterable[str] | None = None,
                  sections: Iterable[str] | None = None, json_path: str | None = None, pin: bool = False,
                  echo: Callable[[str], None] | None = print, impl=None) -> SelfCheck:
    """Run the checks on ``device`` the way this process allows; same arguments as :func:`run_checks`.

    On a CPU device, when this process imported the kernels without ``TRITON_INTERPRET=1`` (so its Triton
    kernels cannot run on CPU tensors), the checks run in a fresh Python with the variable set; its lines go
    to ``echo`` as they come, and a Python that dies without its rows is one FAIL row. ``impl`` applies
    only in this process.
    """
    _check_args(device, size, backends, sections)
    fresh, interpreted, note = how_it_runs(device)
    kw = dict(size=size, backends=None if backends is None else list(backends),
              sections=None if sections is None else list(sections), pin=pin)
    if not fresh:
        rows = run_checks(device, json_path=json_path, echo=echo, impl=impl, **kw)
        return SelfCheck(rows, interpreted, note)
    say = echo or (lambda line: None)
    with tempfile.TemporaryDirectory(prefix="maws_selfcheck_") as tmp:
        out = json_path or str(Path(tmp) / "rows.json")
        spec = json.dumps({"device": str(device), "json_path": out, **kw})
        env = dict(os.environ, TRITON_INTERPRET="1")
        # the child imports this package from where this process found it, installed or not
        here = str(Path(mk.__file__).resolve().parents[1])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (here, os.environ.get("PYTHONPATH")) if p)
        code = "import sys; from maws_kernels.selfcheck import _child_main; sys.exit(_child_main(sys.argv[1]))"
        with subprocess.Popen([sys.executable, "-c", code, spec], env=env, stdout=subprocess.PIPE, text=True) as p:
            for line in p.stdout:
                say(line.rstrip("\n"))
        rows = json.loads(Path(out).read_text()) if Path(out).is_file() else []
        if p.returncode not in (0, 1) or (p.returncode == 1 and all(r["ok"] for r in rows)):
            line = f"the interpreter's Python (TRITON_INTERPRET=1) exited {p.returncode} after {len(rows)} rows"
            say(f"FAIL selfcheck: {line}")
            rows.append({"check": "selfcheck", "ok": False, "error": line})
    return SelfCheck(rows, interpreted, note)


def _child_main(spec: str) -> int:
    """The fresh Python of :func:`run_selfcheck`: run the checks here, one line each on stdout."""
    kw = json.loads(spec)
    rows = run_checks(kw.pop("device"), echo=lambda line: print(line, flush=True), **kw)
    return 0 if rows and all(r["ok"] for r in rows) else 1


def extension_problem() -> str | None:
    """Why ``maws_kernels._C`` (the CUDA C++ twins) cannot be loaded here, or None when it is built and loads."""
    return _backend._EXT_ERROR


def summary_line(rows: list[dict]) -> str:
    """The last line of a run: all matched, or how many of how many checks failed."""
    bad = sum(not r["ok"] for r in rows)
    if rows and not bad:
        return f"all kernels match their references ({len(rows)} checks)"
    return f"SOME KERNELS DIFFER: {bad} of {len(rows)} checks failed" if rows else "SOME KERNELS DIFFER: nothing ran"


def header(device: str) -> str:
    """One line of what this process runs with: versions, the extension, each backend on ``device``."""
    try:
        import triton
        tri = f"triton {triton.__version__}"
    except Exception:  # noqa: BLE001 - absent or broken: the backends line says why
        tri = "triton not importable"
    ext = extension_problem()
    bes = ", ".join(f"{b} {'yes' if backend_problem(b, device) is None else 'no'}" for b in BACKENDS)
    return (f"maws_kernels {mk.__version__} | torch {torch.__version__} | {tri} | _C "
            f"{'built' if ext is None else 'not built'} | on {device}: {bes}")


def sanitizer_backends(device: str | torch.device) -> list[str]:
    """triton (a FAIL row where it cannot run), and cuda where maws_kernels._C is built: the compiled kernels."""
    return ["triton"] + [b for b in ("cuda",) if backend_problem(b, device) is None]


def main(argv: list[str] | None = None, *, prog: str = "python -m maws_kernels.selfcheck", device: str | None = None,
         size: str = "small", backends: Callable[[str], list[str]] | None = None, impl=None,
         description: str | None = None) -> int:
    """The command line; the keyword arguments are its defaults (benchmarks/sanitize_kernels.py sets its own).
    ``backends`` gives a device's default backends (None: every one that can run where the checks run)."""
    p = argparse.ArgumentParser(prog=prog, description=description or __doc__.split("\n")[0])
    p.add_argument("device", nargs="?", default=device,
                   help=f"cuda, cuda:N or cpu (default: {device or 'cuda if there is one, else cpu'}); on cpu the "
                        "Triton kernels run under the interpreter")
    p.add_argument("--size", choices=tuple(SIZES), default=size, help=f"the shapes (default: {size})")
    p.add_argument("--backends", default=None,
                   help=f"comma-separated subset of {','.join(BACKENDS)} (default: "
                        f"{backends.__doc__.splitlines()[0] if backends else 'every one that can run there'})")
    p.add_argument("--json", default=None, help="write the rows here, rewritten after each")
    p.add_argument("--only", choices=("all", "cuda"), default="all", help="cuda: only the CUDA C++ twins")
    p.add_argument("--pin-attention", action="store_true",
                   help="each autotuned kernel runs the first config its prune allows (maws_kernels.tuning.pinned)")
    p.add_argument("--sections", default=None, help=f"comma-separated subset of {','.join(SECTIONS)} (default: all)")
    args = p.parse_args(argv)
    dev = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    chosen = args.sections.split(",") if args.sections else None
    wanted = args.backends.split(",") if args.backends else None
    try:
        _check_args(dev, args.size, wanted, chosen)
    except (ValueError, RuntimeError) as e:
        p.error(str(e))
    if torch.device(dev).type == "cuda" and not torch.cuda.is_available():
        print(f"{prog}: needs a CUDA device (or pass cpu: the Triton kernels then run under the interpreter)",
              file=sys.stderr)
        return 2
    if args.only == "cuda":  # the twins alone (compute-sanitizer's racecheck watches ours, not Triton's)
        c = Checks(args.json, SIZES[args.size], ["cuda"])
        if backend_problem("cuda", dev) is not None:
            c.add({"check": "cuda twins", "ok": False, "error": "maws_kernels._C is not built"})
            print("FAIL cuda twins: maws_kernels._C is not built")
        else:
            torch.manual_seed(0)
            with c.section("patch + norm_pix_loss (cuda)"):
                (impl or _this_module())._patch_and_loss(c, dev, ["cuda"])
            torch.cuda.synchronize()
        rows = c.rows
    else:
        print(header(dev))
        note = how_it_runs(dev)[2]
        if note:
            print(note)
        rows = run_selfcheck(dev, size=args.size, backends=wanted if wanted is not None or not backends else backends(dev),
                             sections=chosen, json_path=args.json, pin=args.pin_attention,
                             echo=lambda line: print(line, flush=True), impl=impl).rows
    print(summary_line(rows))
    return 0 if rows and all(r["ok"] for r in rows) else 1


if __name__ == "__main__":
    sys.exit(main())
