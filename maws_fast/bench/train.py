"""Training-step throughput benchmark (``maws-bench train``, ``benchmarks/bench_train.py``).

Times full MAE and WSP training steps (forward, backward, AdamW) of a preset on synthetic
images, for each attention backend in the same run, and reports images/s, achieved TFLOP/s
(analytic FLOPs, see maws_fast.models.flops), MFU where the peak is known, and the ratio of
each provider to the reference ("manual") path. Each row is appended to a JSON results file the
moment it is measured (a provider that raises leaves a failed row and the next one runs), with the
device, commit, date and command, so README tables are generated, never typed.
"""
from __future__ import annotations

import argparse

import torch

import maws_kernels
from maws_kernels.nn import available_attention_backends
from maws_fast.bench.common import default_out, env_info, peak_tflops, time_steps
from maws_fast.bench.results import ResultsFile, failed, is_measured
from maws_fast.config import ATTN_BACKENDS, PRESETS, OptimConfig, model_preset
from maws_fast.errors import ConfigError
from maws_fast.models import build_classifier, build_mae
from maws_fast.models.flops import flops_per_image
from maws_fast.train.objectives import wsp_loss
from maws_fast.train.optim import build_optimizer


def add_train_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--preset", default="tiny", choices=sorted(PRESETS))
    p.add_argument("--batch-size", type=int, default=256)
    p.add_argument("--steps", type=int, default=10, help="timed steps per provider")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--stages", default="mae,wsp")
    p.add_argument("--attn", default=None,
                   help=f"attention backends to compare, from {ATTN_BACKENDS} (default: those this device can run)")
    p.add_argument("--kernels", default="auto",
                   help="maws_kernels backends to compare (auto = best for the device, triton, cuda, torch)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--dtype", default="bf16" if torch.cuda.is_available() else "fp32", choices=["fp32", "bf16"])
    p.add_argument("--num-classes", type=int, default=14, help="WSP head size")
    p.add_argument("--out", default=default_out("train.json"),
                   help="JSON file to append to, relative to the current directory ('' = none)")


def bench_train(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("maws-bench: --device cuda but torch sees no CUDA device")
    attn = args.attn if args.attn is not None else ",".join(available_attention_backends(device))
    backends = [b for b in attn.split(",") if b]
    bad = [b for b in backends if b not in ATTN_BACKENDS]
    if bad:
        raise ConfigError(f"maws-bench: unknown attention backend(s) {bad}; choose from {ATTN_BACKENDS}")
    kernel_opts = [k for k in args.kernels.split(",") if k]
    bad = [k for k in kernel_opts if k not in ("auto", *maws_kernels.BACKENDS)]
    if bad:
        raise ConfigError(f"maws-bench: unknown kernel backend(s) {bad}; choose from auto, {', '.join(maws_kernels.BACKENDS)}")
    cfg = model_preset(args.preset)
    amp = torch.autocast(device.type, dtype=torch.bfloat16, enabled=args.dtype == "bf16")
    info = env_info()
    out = ResultsFile(args.out, "maws-bench train")  # each row is written the moment it is measured
    peak = peak_tflops(info["device"])
    x = torch.randn(args.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    stages = [s for s in args.stages.split(",") if s]
    bad = [s for s in stages if s not in ("mae", "wsp")]
    if bad:
        raise ConfigError(f"maws-bench: unknown stage(s) {bad}; choose mae or wsp")
    for stage in stages:
        label = {"bench": "train", "stage": stage, "preset": args.preset, "batch_size": args.batch_size,
                 "dtype": args.dtype, **info}
        try:
            step, model, flops = _stage_step(stage, cfg, x, args, amp, device)
        except Exception as e:  # the stage's row says why; the next stage runs
            out.add(failed({**label, "provider": None}, e))
            continue
        # baseline: the reference path (manual attention; torch kernels where those are compared)
        base_kb = "torch" if "torch" in kernel_opts else kernel_opts[-1]
        base_name = "attn=manual" + (f" kernels={base_kb}" if kernel_opts != ["auto"] else "")
        for kb in kernel_opts:
            for backend in backends:
                name = f"attn={backend}" + (f" kernels={kb}" if kernel_opts != ["auto"] else "")
                row = {**label, "provider": name}
                try:
                    model.set_kernel_backend(None if kb == "auto" else kb)
                    model.set_attn_backend(backend)
                    sec = time_steps(step, args.steps, args.warmup, device)
                except Exception as e:  # this provider's row says why; the next one runs
                    out.add(failed(row, e))
                    continue
                ips = args.batch_size / sec
                tflops = ips * flops / 1e12
                row.update(ms_per_step=round(sec * 1e3, 3), images_per_s=round(ips, 1), tflops=round(tflops, 4),
                           mfu=round(tflops / peak, 4) if peak and device.type == "cuda" else None)
                out.add(row)
                _vs_manual(out.rows, stage, base_name)
                out.save()
    for r in out.rows:
        if not is_measured(r):
            print(f"{r['stage']:<4} {str(r['provider']):<28} FAILED: {r['error']}")
            continue
        ratio = f"  x{r['speedup_vs_manual']:.2f} vs {r['baseline']}" if r.get("speedup_vs_manual") else ""
        print(f"{r['stage']:<4} {r['provider']:<28} {r['ms_per_step']:9.2f} ms/step {r['images_per_s']:9.1f} img/s "
              f"{r['tflops']:8.4f} TFLOP/s{ratio}")
    if out.path is not None and out.rows:
        print(f"appended {len(out.rows)} rows to {out.path}")
    return out.rows


def _stage_step(stage: str, cfg, x: torch.Tensor, args, amp, device: torch.device):
    """(one training step, the model, analytic FLOPs per image) of ``stage`` on the batch ``x``."""
    if stage == "mae":
        model = build_mae(cfg, norm_pix_loss=True).to(device)
        loss_fn = lambda: model(x)[0]  # noqa: E731
        flops = flops_per_image(cfg, "mae")
    else:
        model = build_classifier(cfg, args.num_classes, pos_embed_learnable=True).to(device)  # as wsp.pos_embed=learned
        target = torch.softmax(torch.randn(args.batch_size, args.num_classes, device=device), -1)
        loss_fn = lambda: wsp_loss(model, x, target)  # noqa: E731  (the loss training runs)
        flops = flops_per_image(cfg, "wsp", args.num_classes)
    opt = build_optimizer(model, OptimConfig(batch_size=args.batch_size), device)

    def step():
        with amp:
            loss = loss_fn()
        opt.zero_grad(set_to_none=True)
        loss.backward()
        opt.step()

    return step, model, flops


def _vs_manual(rows: list[dict], stage: str, base_name: str) -> None:
    """Each measured row of ``stage`` against the reference path's row (once that has run)."""
    rows = [r for r in rows if r["stage"] == stage and is_measured(r)]
    base = next((r for r in rows if r["provider"] == base_name), None)
    for r in rows:
        if base:
            r["speedup_vs_manual"] = round(base["ms_per_step"] / r["ms_per_step"], 3)
            r["baseline"] = base_name
