"""Kernel micro-benchmarks (``maws-bench kernels``, ``benchmarks/bench_<op>.py``).

For every op case (an op at one model's MAE/WSP shape and one dtype) and every provider
("ours" = the Triton kernel, "cuda" = the csrc twin where one exists, "torch" = the eager
reference, "compile" = ``torch.compile`` of that reference) it times the forward, the backward
alone and both together with :func:`maws_fast.bench.common.bench_ms` (``triton.testing.do_bench``
median on a GPU). It prints ms, GB/s against the minimum bytes the op must move, that as a
percentage of the measured device copy bandwidth, and the speedup over torch eager in the same
run, then appends one row per (case, provider, mode) to ``benchmarks/results/kernels.json``.

On a CPU the same code runs with the Triton interpreter; the numbers then only prove the
benchmark works and must not be reported as kernel speed (rows are marked ``"interpreted"``).
"""
from __future__ import annotations

import argparse
import importlib
import os
from dataclasses import dataclass, field
from typing import Callable, Iterator

import torch

from maws_fast.bench.common import append_results, bench_ms, copy_bandwidth_gbps, env_info
from maws_fast.config import model_preset
from maws_fast.errors import ConfigError

OPS = ("masked_patchify", "norm_pix_loss", "layer_norm", "add_layer_norm", "bias_gelu", "cross_entropy", "adamw", "attention",
       "contrastive")
PROVIDERS = ("ours", "cuda", "torch", "compile")
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

    @property
    def grad_inputs(self) -> list[torch.Tensor]:
        return [a for a in self.args if isinstance(a, torch.Tensor) and a.requires_grad]


def load_cases(op: str) -> Callable[..., Iterator[Case]]:
    """The ``cases(shapes, dtype, device)`` generator of ``maws_fast.bench.cases.<op>``."""
    if op not in OPS:
        raise ConfigError(f"maws-bench kernels: unknown op {op!r}; choose from {OPS}")
    return importlib.import_module(f"maws_fast.bench.cases.{op}").cases


def _time_modes(fn: Callable, case: Case, device: torch.device, rep_ms: int) -> dict[str, float]:
    args, leaves = case.args, case.grad_inputs
    out = {"fwd": bench_ms(lambda: fn(*args), device, rep_ms=rep_ms)}
    if case.bytes_bwd and leaves:
        y = fn(*args)
        dy = torch.randn_like(y) if y.dim() else torch.ones_like(y)
        out["bwd"] = bench_ms(lambda: y.backward(dy, retain_graph=True), device, grad_to_none=leaves, rep_ms=rep_ms)
        out["both"] = bench_ms(lambda: fn(*args).backward(dy), device, grad_to_none=leaves, rep_ms=rep_ms)
    return out


def _peak_mb(fn: Callable, case: Case, device: torch.device) -> float | None:
    """Peak CUDA memory one forward + backward adds on top of the inputs, in MiB (None on CPU)."""
    if device.type != "cuda":
        return None
    for a in case.grad_inputs:
        a.grad = None
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    y = fn(*case.args)
    if case.bytes_bwd and case.grad_inputs:
        y.backward(torch.ones_like(y))
    del y
    torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() - base
    for a in case.grad_inputs:
        a.grad = None
    return round(peak / 2**20, 2)


def run_cases(cases: list[Case], providers: tuple[str, ...], device: torch.device, rep_ms: int = 100) -> list[dict]:
    """Time every (case, provider, mode); returns result rows (not yet written)."""
    info = env_info()
    interpreted = os.environ.get("TRITON_INTERPRET") == "1"
    copy_bw = copy_bandwidth_gbps(device)
    rows = []
    for case in cases:
        fns = dict(case.fns)
        if "compile" in providers and "torch" in fns:
            fns["compile"] = torch.compile(fns["torch"], dynamic=False)
        base: dict[str, float] = {}
        # the standard providers as selected, then any op-specific ones (e.g. each SDPA backend)
        names = [p for p in PROVIDERS if p in providers and p in fns] + [p for p in fns if p not in PROVIDERS]
        for name in names:
            peak = _peak_mb(fns[name], case, device)
            for mode, ms in _time_modes(fns[name], case, device, rep_ms).items():
                nbytes = case.bytes_fwd if mode == "fwd" else case.bytes_bwd if mode == "bwd" else case.bytes_fwd + case.bytes_bwd
                gbps = nbytes / (ms * 1e-3) / 1e9
                flops = {"fwd": case.flops_fwd, "bwd": case.flops_bwd}.get(mode, case.flops_fwd + case.flops_bwd)
                if name == "torch":
                    base[mode] = ms
                rows.append({
                    "bench": "kernels", "op": case.op, "provider": name, "shape": case.shape, "dtype": case.dtype,
                    "mode": mode, "ms": round(ms, 4), "gbps": round(gbps, 1),
                    "pct_copy_bw": round(100 * gbps / copy_bw, 1), "copy_gbps": round(copy_bw, 1),
                    "tflops": round(flops / (ms * 1e-3) / 1e12, 2) if flops else None,
                    "peak_mb": peak, "note": case.note, "interpreted": interpreted, **case.extra, **info,
                })
        for r in rows:
            if r["op"] == case.op and r["shape"] == case.shape and r["dtype"] == case.dtype and r["mode"] in base:
                r["speedup_vs_torch"] = round(base[r["mode"]] / r["ms"], 3)
    return rows


def print_rows(rows: list[dict]) -> None:
    if not rows:
        return
    print(f"copy bandwidth: {rows[0]['copy_gbps']:.0f} GB/s on {rows[0]['device']}"
          + ("  (Triton INTERPRETED: timings are not kernel speed)" if rows[0]["interpreted"] else ""))
    print(f"{'op':<22}{'shape':<48}{'dtype':<9}{'provider':<15}{'mode':<5}{'ms':>10}{'GB/s':>9}{'%copy':>7}"
          f"{'TFLOP/s':>9}{'vs torch':>9}{'peak MiB':>10}")
    for r in rows:
        ratio = f"x{r['speedup_vs_torch']:.2f}" if "speedup_vs_torch" in r else "-"
        peak = "-" if r.get("peak_mb") is None or r["mode"] != "fwd" else f"{r['peak_mb']:.1f}"
        tf = "-" if r.get("tflops") is None else f"{r['tflops']:.1f}"
        print(f"{r['op']:<22}{r['shape']:<48}{r['dtype']:<9}{r['provider']:<15}{r['mode']:<5}"
              f"{r['ms']:>10.3f}{r['gbps']:>9.1f}{r['pct_copy_bw']:>7.1f}{tf:>9}{ratio:>9}{peak:>10}")


def add_kernel_args(p: argparse.ArgumentParser, ops: tuple[str, ...] = OPS) -> None:
    gpu = torch.cuda.is_available()
    p.add_argument("--ops", default=",".join(ops), help=f"comma list from {OPS}")
    p.add_argument("--models", default="vit_b16,vit_l16,vit_h14" if gpu else "tiny",
                   help="presets whose MAE/WSP shapes to use")
    p.add_argument("--batch-size", type=int, default=256 if gpu else 2)
    p.add_argument("--dtypes", default="bf16,fp32" if gpu else "fp32", help=f"comma list from {tuple(DTYPES)}")
    p.add_argument("--providers", default="ours,cuda,torch,compile" if gpu else "ours,torch",
                   help=f"comma list from {PROVIDERS}")
    p.add_argument("--device", default="cuda" if gpu else "cpu")
    p.add_argument("--rep-ms", type=int, default=100, help="do_bench repetition budget per timing (GPU)")
    p.add_argument("--out", default="benchmarks/results/{group}.json",
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
    if device.type == "cpu" and "ours" in providers and os.environ.get("TRITON_INTERPRET") != "1":
        raise ConfigError("maws-bench kernels: Triton runs on a CPU only under its interpreter; set TRITON_INTERPRET=1 "
                          "before starting (the timings then prove the benchmark runs, not kernel speed), or pass "
                          "--providers torch,compile")
    dtypes = _split(args.dtypes, DTYPES, "dtype(s)")
    shapes = [mae_shape(m, args.batch_size) for m in args.models.split(",") if m]
    rows = []
    for op in ops:
        op_rows = []
        for dt in dtypes:
            # one case at a time: an H/14 AdamW case alone holds ~11 GB of buffers
            for case in load_cases(op)(shapes, DTYPES[dt], device):
                op_rows += run_cases([case], providers, device, args.rep_ms)
                del case
        print_rows(op_rows)
        rows += op_rows
    for group in ("kernels", "attention"):
        group_rows = [r for r in rows if (r["op"] == "attention") == (group == "attention")]
        if args.out and group_rows:
            path = args.out.format(group=group)
            append_results(path, group_rows)
            print(f"appended {len(group_rows)} rows to {path}")
    return rows
