"""Training-step throughput benchmark (``maws-bench train``, ``benchmarks/bench_train.py``).

Times full MAE and WSP training steps (forward, backward, AdamW) of a preset on synthetic
images, for each attention backend in the same run, and reports images/s, achieved TFLOP/s
(analytic FLOPs, see maws_fast.models.flops), MFU where the peak is known, and the ratio of
each provider to the reference ("manual") path. Rows are appended to a JSON results file with
the device, commit, date and command, so README tables are generated, never typed.
"""
from __future__ import annotations

import argparse

import torch

import maws_kernels
from maws_fast.bench.common import append_results, env_info, peak_tflops, time_steps
from maws_fast.config import ATTN_BACKENDS, PRESETS, OptimConfig, model_preset
from maws_fast.errors import ConfigError
from maws_fast.models import build_classifier, build_mae
from maws_fast.models.attention import available_attn_backends
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
    p.add_argument("--out", default="benchmarks/results/train.json",
                   help="JSON file to append to, relative to the current directory ('' = none)")


def bench_train(args: argparse.Namespace) -> list[dict]:
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("maws-bench: --device cuda but torch sees no CUDA device")
    attn = args.attn if args.attn is not None else ",".join(available_attn_backends(device))
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
    info, rows = env_info(), []
    peak = peak_tflops(info["device"])
    x = torch.randn(args.batch_size, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    for stage in args.stages.split(","):
        if stage == "mae":
            model = build_mae(cfg, norm_pix_loss=True).to(device)
            loss_fn = lambda: model(x)[0]  # noqa: E731
            flops = flops_per_image(cfg, "mae")
        elif stage == "wsp":
            model = build_classifier(cfg, args.num_classes).to(device)
            target = torch.softmax(torch.randn(args.batch_size, args.num_classes, device=device), -1)
            loss_fn = lambda: wsp_loss(model, x, target)  # noqa: E731  (the loss training runs)
            flops = flops_per_image(cfg, "wsp", args.num_classes)
        else:
            raise ConfigError(f"maws-bench: unknown stage {stage!r}; choose mae or wsp")
        opt = build_optimizer(model, OptimConfig(batch_size=args.batch_size), device)

        def step():
            with amp:
                loss = loss_fn()
            opt.zero_grad(set_to_none=True)
            loss.backward()
            opt.step()

        # baseline: the reference path (manual attention; torch kernels where those are compared)
        base_kb = "torch" if "torch" in kernel_opts else kernel_opts[-1]
        base, base_name = None, None
        for kb in kernel_opts:
            model.set_kernel_backend(None if kb == "auto" else kb)
            for backend in backends:
                model.set_attn_backend(backend)
                sec = time_steps(step, args.steps, args.warmup, device)
                ips = args.batch_size / sec
                tflops = ips * flops / 1e12
                name = f"attn={backend}" + (f" kernels={kb}" if kernel_opts != ["auto"] else "")
                row = {"bench": "train", "stage": stage, "preset": args.preset, "provider": name,
                       "batch_size": args.batch_size, "dtype": args.dtype, "ms_per_step": round(sec * 1e3, 3),
                       "images_per_s": round(ips, 1), "tflops": round(tflops, 4),
                       "mfu": round(tflops / peak, 4) if peak and device.type == "cuda" else None, **info}
                if backend == "manual" and kb == base_kb:
                    base, base_name = sec, name
                rows.append(row)
        for row in rows:
            if row["stage"] == stage and base:
                row["speedup_vs_manual"] = round(base / (row["ms_per_step"] / 1e3), 3)
                row["baseline"] = base_name
    for r in rows:
        ratio = f"  x{r['speedup_vs_manual']:.2f} vs {r['baseline']}" if r.get("speedup_vs_manual") else ""
        print(f"{r['stage']:<4} {r['provider']:<28} {r['ms_per_step']:9.2f} ms/step {r['images_per_s']:9.1f} img/s "
              f"{r['tflops']:8.4f} TFLOP/s{ratio}")
    if args.out:
        append_results(args.out, rows)
        print(f"appended {len(rows)} rows to {args.out}")
    return rows
