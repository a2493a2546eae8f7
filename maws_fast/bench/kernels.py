"""Kernel micro-benchmarks (``maws-bench kernels``, ``benchmarks/bench_<op>.py``).

For every op case (an op at one model's MAE/WSP shape and one dtype) and every provider
("ours" = the Triton kernel, "cuda" = the csrc twin where one exists, "torch" = the eager
reference, "compile" = ``torch.compile`` of that reference) it times the forward, the backward
alone and both together with :func:`maws_fast.bench.common.bench_ms` (``triton.testing.do_bench``
median on a GPU). It prints ms, GB/s against the minimum bytes the op must move, that as a
percentage of the measured device copy bandwidth, and the speedup over torch eager in the same
run, and appends one row per (case, provider, mode) to ``benchmarks/results/kernels.json`` the
moment it is measured (:class:`~maws_fast.bench.results.ResultsFile`). A provider that raises
leaves a failed row and the run goes on; one that cannot run a case (cuDNN SDPA on fp32) leaves a
skipped row. Peak memory is measured after a warm-up call (compile, autotuning), never over it.
The compile provider compiles each case afresh (its rows say how many graphs it compiled).

"liger" is Liger-Kernel (the ``liger-kernel`` package, through its public functional API) where it
is installed, timed in the same harness: each case module gives it Liger's function of the same math,
or a skipped row saying why Liger has no equivalent (soft targets, attention, AdamW, ...). Before it
is timed, its output and every input gradient are checked against the torch reference
(:func:`check_against_torch`), so a wrapping that computes something else is a failed row, not a
number. It is a default provider on a GPU where ``liger_kernel`` is importable.

On a CPU the same code runs with the Triton interpreter; the numbers then only prove the
benchmark works and must not be reported as kernel speed (rows are marked ``"interpreted"``).
"""
from __future__ import annotations

import argparse
import importlib
import importlib.metadata
import importlib.util
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from maws_fast.bench.common import bench_ms, copy_bandwidth_gbps, default_out, env_info
from maws_fast.bench.peak import peak_memory
from maws_fast.bench.results import ResultsFile, failed, is_measured, skipped
from maws_fast.config import model_preset
from maws_fast.errors import ConfigError
from maws_fast.train.regional_compile import compile_backend, compile_counts

OPS = ("masked_patchify", "norm_pix_loss", "layer_norm", "add_layer_norm", "bias_gelu", "cross_entropy", "adamw", "attention",
       "contrastive")
# "liger" last: Liger's cross-entropy writes its gradient into the logits it is given (its memory
# trick), so on a case it shares inputs with the others it runs after them.
PROVIDERS = ("ours", "cuda", "torch", "compile", "liger")
LIGER_PACKAGE = "liger-kernel"  # the pip package of the "liger" provider; it imports as liger_kernel
LIGER_MISSING = f"{LIGER_PACKAGE} is not installed (pip install {LIGER_PACKAGE})"
DTYPES = {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}


def dtype_name(dtype: torch.dtype) -> str:
    """"bf16" for torch.bfloat16: the names of ``--dtypes``, used in every results row."""
    return next(k for k, v in DTYPES.items() if v == dtype)


@dataclass(frozen=True)
class MaeShape:
    """The tensor shapes one model's MAE / WSP step feeds the memory-bound ops."""

    model: str  # preset name, e.g. "vit_b16"
    batch: int
    img: int  # image side
    patch: int
    chans: int
    width: int  # encoder width D
    dec_width: int  # decoder width
    num_patches: int  # L
    keep: int  # K = int(L * (1 - 0.75))

    @property
    def label(self) -> str:
        return f"{self.model} b{self.batch}"


def mae_shape(model: str, batch: int, img: int | None = None) -> MaeShape:
    """Shapes of ``model`` (a preset name) at ``batch`` and image side ``img`` (default: preset's)."""
    cfg = model_preset(model)
    img = img or cfg.img_size
    L = (img // cfg.patch_size) ** 2
    return MaeShape(model, batch, img, cfg.patch_size, cfg.in_chans, cfg.embed_dim, cfg.decoder_embed_dim, L,
                    int(L * 0.25))


@dataclass
class Case:
    """One op at one shape and dtype.

    ``fns`` maps provider name to a function of ``*args`` returning one tensor (the forward, or
    the whole step of an op without backward). The harness adds "compile" from ``fns["torch"]``.
    ``skip`` names providers that cannot run this case (cuDNN SDPA on fp32): they are not
    attempted, and their rows say why.
    ``bytes_fwd`` / ``bytes_bwd`` are the minimum bytes a fused implementation must read + write
    (``bytes_bwd == 0``: no backward); GB/s is reported against them for every provider.
    """

    op: str
    shape: str
    dtype: str
    args: tuple
    fns: dict[str, Callable[..., torch.Tensor]]
    bytes_fwd: int
    bytes_bwd: int = 0
    note: str = ""
    extra: dict = field(default_factory=dict)  # op-specific columns copied into every row
    flops_fwd: int = 0  # matmul FLOPs of the forward (compute-bound ops: TFLOP/s is reported)
    flops_bwd: int = 0
    skip: dict[str, str] = field(default_factory=dict)  # provider -> why it cannot run this case (a skipped row)

    @property
    def grad_inputs(self) -> list[torch.Tensor]:
        return [a for a in self.args if isinstance(a, torch.Tensor) and a.requires_grad]


def liger_installed() -> bool:
    """True where ``liger_kernel`` can be imported (found on the path; nothing is imported)."""
    return importlib.util.find_spec("liger_kernel") is not None


def liger_functional():
    """``liger_kernel.transformers.functional``, Liger's public functional API, imported on first use:
    the case modules call it inside their liger functions, so nothing of Liger loads unless the
    provider runs (its first call is the check before timing, never a timed one)."""
    return importlib.import_module("liger_kernel.transformers.functional")


def load_cases(op: str) -> Callable[..., Iterator[Case]]:
    """The ``cases(shapes, dtype, device)`` generator of ``maws_fast.bench.cases.<op>``."""
    if op not in OPS:
        raise ConfigError(f"maws-bench kernels: unknown op {op!r}; choose from {OPS}")
    return importlib.import_module(f"maws_fast.bench.cases.{op}").cases


def _forward_backward(fn: Callable, case: Case) -> None:
    """One forward (+ backward where the op has one), gradients of the inputs cleared after."""
    y = fn(*case.args)
    if case.bytes_bwd and case.grad_inputs:
        y.backward(torch.ones_like(y))
    del y
    for a in case.grad_inputs:
        a.grad = None


def _peak_mb(fn: Callable, case: Case, device: torch.device) -> float | None:
    """Peak CUDA memory one forward + backward adds on top of the inputs, in MiB (None off CUDA).

    One warm-up forward + backward runs first, outside the window: a compile, an autotuning sweep
    or the allocator's growth on the first call is not what the op needs."""
    window = peak_memory(device)
    if window is None:
        return None
    _forward_backward(fn, case)  # warm-up: compile, autotune
    window.open()
    _forward_backward(fn, case)
    return round(window.added() / 2**20, 2)


def _timers(fn: Callable, case: Case, device: torch.device, rep_ms: int) -> list[tuple[str, Callable[[], float]]]:
    """(mode, a function timing it in ms) for fwd, and bwd / both where the op has a backward."""
    args, leaves = case.args, case.grad_inputs
    timers = [("fwd", lambda: bench_ms(lambda: fn(*args), device, rep_ms=rep_ms))]
    if not (case.bytes_bwd and leaves):
        return timers
    graph: dict = {}

    def output_and_grad():  # one graph (retained) whose backward "bwd" times, and its output gradient
        if not graph:
            y = fn(*args)
            graph.update(y=y, dy=torch.randn_like(y) if y.dim() else torch.ones_like(y))
        return graph["y"], graph["dy"]

    def bwd():
        y, dy = output_and_grad()
        return bench_ms(lambda: y.backward(dy, retain_graph=True), device, grad_to_none=leaves, rep_ms=rep_ms)

    def both():
        _, dy = output_and_grad()
        return bench_ms(lambda: fn(*args).backward(dy), device, grad_to_none=leaves, rep_ms=rep_ms)

    return timers + [("bwd", bwd), ("both", both)]



def _compiled(fn: Callable, backend: str) -> Callable:
    """``torch.compile`` of one case's torch reference, from empty caches. The references of every
    case share their code objects (one function, many shapes and dtypes), and dynamo's recompile
    limit (8) counts per code object: without the reset the 9th shape would run eager, unlabelled.
    ``dynamic=False``: each case is compiled for its exact shape, as a fixed-shape training step is."""
    import torch._dynamo as dynamo

    dynamo.reset()
    return torch.compile(fn, dynamic=False, backend=backend)


# Providers checked against the torch reference before they are timed: a third party's kernel is
# wrapped by us, and a wrapping that passes the wrong eps, reduction or bias must not become a number.
CHECKED_PROVIDERS = ("liger",)
CHECK_ATOL = {"fp32": 1e-4, "fp16": 5e-3, "bf16": 2e-2}  # times the reference's largest magnitude


class ProviderMismatch(RuntimeError):
    """A checked provider's output or gradient is further from the fp32 reference than torch's own."""


def _fresh_args(args: tuple, dtype: torch.dtype | None = None) -> list:
    """Copies of the case inputs (floating tensors cast to ``dtype`` if given), so no provider's
    in-place writes (Liger's cross-entropy overwrites its logits) reach the inputs timed later."""
    out = []
    for a in args:
        if isinstance(a, torch.Tensor):
            t = a.detach().clone()
            t = t.to(dtype) if dtype is not None and t.is_floating_point() else t
            a = t.requires_grad_(a.requires_grad)
        out.append(a)
    return out


def _results(fn: Callable, case: Case, dtype: torch.dtype | None = None) -> list[torch.Tensor | None]:
    """fp32 copies of ``fn``'s output and of the gradients of the case's grad inputs (for one fixed
    output gradient, seeded, the same for every provider), computed on fresh input copies."""
    args = _fresh_args(case.args, dtype)
    y = fn(*args)
    out: list[torch.Tensor | None] = [y.detach().float()]
    leaves = [a for a in args if isinstance(a, torch.Tensor) and a.requires_grad]
    if case.bytes_bwd and leaves:
        dy = torch.ones_like(y) if y.dim() == 0 else \
            torch.randn(y.shape, generator=torch.Generator().manual_seed(0)).to(y)
        out += [None if g is None else g.float() for g in torch.autograd.grad(y, leaves, dy, allow_unused=True)]
    return out


def check_against_torch(name: str, fn: Callable, case: Case) -> None:
    """Raise :class:`ProviderMismatch` unless ``fn`` computes what ``case.fns["torch"]`` does.

    The flash-attention test rule (house style): against the torch reference run in fp32, the
    provider's error may be at most twice that of the torch reference run in the case dtype, plus
    ``CHECK_ATOL[dtype]`` times the largest magnitude of the fp32 result; for the output and for
    each input gradient. Rounding differences pass; a wrong eps, a sum for a mean or a lost bias do not."""
    ref = _results(case.fns["torch"], case, torch.float32)
    same = _results(case.fns["torch"], case) if case.dtype != "fp32" else ref
    got = _results(fn, case)
    what = ["output"] + [f"grad of input {i}" for i, a in enumerate(case.args)
                         if isinstance(a, torch.Tensor) and a.requires_grad]
    for label, r, t, g in zip(what, ref, same, got):
        if r is None or g is None:
            if (r is None) != (g is None):
                raise ProviderMismatch(f"{name}: the {label} is {'missing' if g is None else 'unexpected'} "
                                       "against the torch reference")
            continue
        if g.shape != r.shape:
            raise ProviderMismatch(f"{name}: the {label} has shape {tuple(g.shape)}, the torch reference "
                                   f"{tuple(r.shape)}")
        scale = max(r.abs().max().item(), 1e-30)
        err, err_torch = (g - r).abs().max().item(), (t - r).abs().max().item()
        tol = 2 * err_torch + CHECK_ATOL[case.dtype] * scale
        if not err <= tol:  # also catches NaN
            raise ProviderMismatch(f"{name}: the {label} differs from the torch reference by {err:.3g} (allowed "
                                   f"{tol:.3g}: 2 x torch {case.dtype}'s {err_torch:.3g} + {CHECK_ATOL[case.dtype]:g} "
                                   f"x its magnitude {scale:.3g})")


def run_cases(cases: list[Case], providers: tuple[str, ...], device: torch.device, rep_ms: int = 100,
              results: ResultsFile | None = None, compile_backend: str = "inductor") -> list[dict]:
    """Time every (case, provider, mode); returns the rows, each added to ``results`` the moment it
    is measured (and saved again when the torch baseline, measured later, adds its speed-up). A
    provider that raises gets a failed row and the next one runs; a requested provider the case
    cannot run (``case.skip``, or no implementation) gets a skipped row and is not attempted."""
    info = env_info()
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    copy_bw = copy_bandwidth_gbps(device)
    results = results if results is not None else ResultsFile(None)
    rows = []
    for case in cases:
        fns = dict(case.fns)
        base: dict[str, float] = {}
        # the standard providers as selected, then any op-specific ones (e.g. each SDPA backend)
        # skip reasons of a standard provider only where it was selected (Liger's n/a rows with liger)
        names = [p for p in PROVIDERS if p in providers] + [p for p in fns if p not in PROVIDERS] \
            + [p for p in case.skip if p not in PROVIDERS or p in providers]
        label = {"bench": "kernels", "op": case.op, "shape": case.shape, "dtype": case.dtype, "note": case.note,
                 "interpreted": interpreted, **case.extra, **info}
        for name in dict.fromkeys(names):
            who = {**label, "provider": name, **_provider_label(name)}
            reason = case.skip.get(name) or _missing(name, fns)
            if reason:
                rows.append(results.add(skipped({**who, "mode": None}, reason)))
                continue
            mode, start = None, compile_counts()
            try:
                fn = _compiled(fns["torch"], compile_backend) if name == "compile" else fns[name]
                if name in CHECKED_PROVIDERS:
                    check_against_torch(name, fn, case)
                peak = _peak_mb(fn, case, device)
                for mode, timer in _timers(fn, case, device, rep_ms):
                    ms = timer()
                    nbytes = case.bytes_fwd if mode == "fwd" else case.bytes_bwd if mode == "bwd" else case.bytes_fwd + case.bytes_bwd
                    gbps = nbytes / (ms * 1e-3) / 1e9
                    flops = {"fwd": case.flops_fwd, "bwd": case.flops_bwd}.get(mode, case.flops_fwd + case.flops_bwd)
                    if name == "torch":
                        base[mode] = ms
                    row = {**who, "mode": mode, "ms": round(ms, 4), "gbps": round(gbps, 1),
                           "pct_copy_bw": round(100 * gbps / copy_bw, 1), "copy_gbps": round(copy_bw, 1),
                           "tflops": round(flops / (ms * 1e-3) / 1e12, 2) if flops else None, "peak_mb": peak}
                    if name == "compile":
                        row.update(_compile_label(start, compile_backend))
                    rows.append(results.add(row))
            except Exception as e:  # this provider's remaining modes are lost, not the run: the next provider goes on
                rows.append(results.add(failed({**who, "mode": mode}, e)))
                if device.type == "cuda":
                    torch.cuda.empty_cache()  # what the failed provider held is not the next one's
            for r in rows:
                if r["op"] == case.op and r["shape"] == case.shape and r["dtype"] == case.dtype and r["mode"] in base \
                        and is_measured(r):
                    r["speedup_vs_torch"] = round(base[r["mode"]] / r["ms"], 3)
            results.save()  # rows written before the torch baseline now carry their speed-up
    return rows


def _provider_label(name: str) -> dict:
    """Columns a provider adds to each of its rows: the liger-kernel version Liger's rows measured."""
    if name != "liger" or not liger_installed():
        return {}
    try:
        return {"liger_kernel": importlib.metadata.version(LIGER_PACKAGE)}
    except importlib.metadata.PackageNotFoundError:  # importable from a path but not pip-installed
        return {"liger_kernel": "unknown"}


def _missing(name: str, fns: dict) -> str | None:
    """Why a requested standard provider has nothing to run for this case (None: it has)."""
    if name == "compile":
        return None if "torch" in fns else "no torch reference to compile for this case"
    if name == "liger" and not liger_installed():  # after the case's own n/a reason, if it has one
        return LIGER_MISSING
    if name in fns:
        return None
    if name == "cuda":
        return "no CUDA C++ twin of this op on this device (maws_kernels._C not built, or the op has none)"
    if name == "liger":  # each case module names Liger's function or says why it has none
        return "Liger has no kernel for this op"
    return f"no {name} implementation of this op on this device"


def _compile_label(start: tuple[int, int], backend: str) -> dict:
    """The compile provider's own evidence: graphs compiled for this case (0: it ran eager, and
    the row says so) and graph breaks met, since its caches were reset."""
    graphs, breaks = (now - then for now, then in zip(compile_counts(), start))
    return {"compile_backend": backend, "compiled_graphs": graphs, "graph_breaks": breaks, "compiled": graphs > 0}


def print_rows(rows: list[dict]) -> None:
    measured = [r for r in rows if is_measured(r)]
    if measured:
        r0 = measured[0]
        print(f"copy bandwidth: {r0['copy_gbps']:.0f} GB/s on {r0['device']}"
              + ("  (Triton INTERPRETED: timings are not kernel speed)" if r0["interpreted"] else ""))
        print(f"{'op':<22}{'shape':<48}{'dtype':<9}{'provider':<15}{'mode':<5}{'ms':>10}{'GB/s':>9}{'%copy':>7}"
              f"{'TFLOP/s':>9}{'vs torch':>9}{'peak MiB':>10}")
    for r in rows:
        head = f"{r['op']:<22}{r['shape']:<48}{r['dtype']:<9}{str(r['provider']):<15}"
        if not is_measured(r):
            print(f"{head}{r['status'].upper()}: {r.get('error') or r.get('reason')}")
            continue
        ratio = f"x{r['speedup_vs_torch']:.2f}" if "speedup_vs_torch" in r else "-"
        peak = "-" if r.get("peak_mb") is None or r["mode"] != "fwd" else f"{r['peak_mb']:.1f}"
        tf = "-" if r.get("tflops") is None else f"{r['tflops']:.1f}"
        flag = "" if r.get("compiled", True) else "  (NOT compiled: ran eager)"
        print(f"{head}{r['mode']:<5}{r['ms']:>10.3f}{r['gbps']:>9.1f}{r['pct_copy_bw']:>7.1f}{tf:>9}{ratio:>9}{peak:>10}{flag}")


def add_kernel_args(p: argparse.ArgumentParser, ops: tuple[str, ...] = OPS) -> None:
    gpu = torch.cuda.is_available()
    p.add_argument("--ops", default=",".join(ops), help=f"comma list from {OPS}")
    p.add_argument("--models", default="vit_b16,vit_l16,vit_h14" if gpu else "tiny",
                   help="presets whose MAE/WSP shapes to use")
    p.add_argument("--batch-size", type=int, default=256 if gpu else 2)
    p.add_argument("--dtypes", default="bf16,fp32" if gpu else "fp32", help=f"comma list from {tuple(DTYPES)}")
    # liger joins the GPU default where it is installed; on a CPU Triton is interpreted, and
    # Liger's LayerNorm does not run under Triton 3.7's interpreter, so it is asked for by name there
    gpu_default = "ours,cuda,torch,compile" + (",liger" if liger_installed() else "")
    p.add_argument("--providers", default=gpu_default if gpu else "ours,torch",
                   help=f"comma list from {PROVIDERS} (liger: Liger-Kernel, where {LIGER_PACKAGE} is installed)")
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition budget per timing (GPU)")
    p.add_argument("--compile-backend", default=None,
                   help="dynamo backend of the compile provider (default: $MAWS_COMPILE_BACKEND, else inductor)")
    p.add_argument("--out", default=default_out("{group}.json"),
                   help="JSON file to append to, relative to the current directory ('' = none); {group} is "
                        "'attention' for the attention op and 'kernels' for the memory-bound ones")


def _split(text: str, allowed, what: str) -> tuple[str, ...]:
    items = tuple(x for x in text.split(",") if x)
    bad = [x for x in items if x not in allowed]
    if bad:
        raise ConfigError(f"maws-bench kernels: unknown {what} {bad}; choose from {tuple(allowed)}")
    return items


def bench_kernels(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("maws-bench kernels: --device cuda but torch sees no CUDA device")
    ops = _split(args.ops, OPS, "op(s)")
    providers = _split(args.providers, PROVIDERS, "provider(s)")
    if "liger" in providers and not liger_installed():
        raise ConfigError(f"maws-bench kernels: --providers liger times Liger-Kernel, but {LIGER_MISSING}; install "
                          "it or drop liger from --providers")
    triton = [p for p in ("ours", "liger") if p in providers]
    if device.type == "cpu" and triton and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError(f"maws-bench kernels: {' and '.join(triton)} run Triton kernels, which run on a CPU only "
                          "under Triton's interpreter; set TRITON_INTERPRET=1 before starting (the timings then prove "
                          "the benchmark runs, not kernel speed), or pass --providers torch,compile")
    dtypes = _split(args.dtypes, DTYPES, "dtype(s)")
    shapes = [mae_shape(m, args.batch_size) for m in args.models.split(",") if m]
    backend = compile_backend(args.compile_backend) if "compile" in providers else "inductor"
    # rows reach their file as they are measured: a case that fails, or a kill, keeps the ones before it
    files = {g: ResultsFile(args.out.format(group=g) if args.out else None, "maws-bench kernels")
             for g in ("kernels", "attention")}
    rows = []
    for op in ops:
        out = files["attention" if op == "attention" else "kernels"]
        op_rows = []
        for dt in dtypes:
            cases = load_cases(op)(shapes, DTYPES[dt], device)
            while True:  # one case at a time: an H/14 AdamW case alone holds ~11 GB of buffers
                try:
                    case = next(cases)
                except StopIteration:
                    break
                except Exception as e:  # building the inputs failed (e.g. out of memory): this dtype's other cases are lost
                    op_rows.append(out.add(failed({"bench": "kernels", "op": op, "shape": "(building the cases)",
                                                   "dtype": dt, "provider": None, "mode": None, **env_info()}, e)))
                    break
                op_rows += run_cases([case], providers, device, args.rep_ms, out, backend)
                del case
        print_rows(op_rows)
        rows += op_rows
    for f in files.values():
        if f.path is not None and f.rows:
            print(f"appended {len(f.rows)} rows to {f.path}")
    return rows


