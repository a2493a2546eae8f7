"""The training-step benchmark (``maws-bench step``, ``benchmarks/bench_step.py``).

Compares, in one run, at ViT-B/16 MAE and ViT-L/16 WSP:

* ``official eager``: the official model structure (:mod:`maws_fast.bench.baseline`) under bf16
  autocast over fp32 weights -- what a user of the official code gets;
* ``official compile``: the same under ``torch.compile`` (measured on a GPU only);
* ``ours eager (autocast)``: maws_fast's model, fused kernels, autocast over fp32 weights;
* ``ours eager``: the GPU default -- bf16 weights (fp32 master and AdamW state in the engine),
  a bf16 residual stream, the fused kernels;
* ``ours compile``: the same with ``run.compile`` (each block's body through ``torch.compile``;
  measured on a GPU only).

``--checkpoint`` adds rows of ours in each activation-checkpointing mode (``run.activation_checkpoint``):
counted saved-activation bytes per image (what a forward leaves alive for backward, checkpoint
inputs and the selective cache included) and GEMM FLOPs with the recomputation, against the same
variant without checkpointing. ``--fit`` writes :mod:`maws_fast.bench.fit`'s COMPUTED table of the
largest per-GPU batch at 80 / 141 GB per preset, stage (MAE, WSP, the fine-tune at each resolution,
LiT; ``--fit-stages``), engine and mode (``fit.json``).

Per variant, counted (:mod:`maws_fast.bench.traffic`, no GPU needed): memory-bound bytes, GEMM and
attention FLOPs and saved-activation bytes per training image, and a labelled roofline PREDICTION
of images/s and MFU on an H100 and an H200 (GEMMs at 989 TFLOP/s, every other kernel at full HBM
bandwidth, no overlap: an upper bound, not a measurement). On a GPU it adds measured images/s,
MFU (analytic FLOPs, the official all-patch count, / 989 TFLOP/s) and peak memory of full steps
(forward, backward, AdamW), its peak memory measured after the warm-up steps (compile and autotuning
excluded). Each row goes to ``benchmarks/results/step.json`` the moment it is measured; a variant
that raises leaves a failed row with the error and the next one runs. The README table is
generated from it. Nothing here is asserted by a test.
"""
from __future__ import annotations

import argparse
from contextlib import ExitStack
from typing import Callable

import torch

from maws_fast.bench.baseline import OfficialMAE, OfficialViT, soft_target_cross_entropy
from maws_fast.bench.common import append_results, default_out, env_info, peak_tflops, time_steps
from maws_fast.bench.fit import ENGINES as FIT_ENGINES
from maws_fast.bench.fit import STAGES as FIT_STAGES
from maws_fast.bench.fit import fit_cases, fit_rows, forward_peak
from maws_fast.bench.peak import peak_memory
from maws_fast.bench.results import ResultsFile, failed, is_measured
from maws_fast.bench.traffic import per_image
from maws_fast.config import CHECKPOINT_MODES, PRESETS, Config, DataConfig, FinetuneConfig, LiTConfig, model_preset
from maws_fast.errors import ConfigError
from maws_fast.models import build_classifier, build_mae
from maws_fast.models.flops import flops_per_image
from maws_fast.models.vit import set_block_options
from maws_fast.train.mixup import Mixup
from maws_fast.train.objectives import FinetuneObjective, LiTObjective, MAEObjective, WSPObjective, wsp_loss
from maws_fast.train.regional_compile import compile_backend, compile_counts

# Roofline inputs (docs/ARCHITECTURE.md, "Performance physics"): dense bf16 TFLOP/s, HBM TB/s.
DEVICES = {"H100": (989.0, 3.35), "H200": (989.0, 4.8)}
VARIANTS = ("official eager", "official compile", "ours eager (autocast)", "ours eager", "ours compile")
MEASURED_ONLY = ("official compile", "ours compile")  # inductor's kernels: no eager op stream to count
GOAL_BYTES_RATIO, GOAL_MFU = 0.5, 0.5  # memory-bound bytes vs official eager; predicted H100 MFU (B/16 MAE)
GOAL_VS_EAGER, GOAL_VS_COMPILE = 2.0, 1.25  # measured img/s of ours eager vs the official variants
GOAL_SELECTIVE_SAVED, GOAL_SELECTIVE_FLOPS = 0.5, 1.05  # selective vs none: saved bytes, GEMM FLOPs per step
# The fit table: every preset, at the DP world a user would shard it over.
FIT_PRESETS = {"vit_b16": 8, "vit_l16": 8, "vit_h14": 8, "vit_2b14": 32, "vit_6.5b14": 64}
# (stage, preset, engine, per-GPU batch) the fit table must show: ViT-H/14 MAE at 256 per H100; the
# 6.5B/14 with ZeRO-3 over 64 GPUs at the official MAE's 4096 and SWAG's 8192 global batch.
FIT_GOALS = (("mae", "vit_h14", "ours:2", 256), ("mae", "vit_6.5b14", "ours:3", 4096 // 64),
             ("wsp", "vit_6.5b14", "ours:3", 8192 // 64))


def add_step_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--cases", default="mae:vit_b16,wsp:vit_l16",
                   help="stage:preset pairs (stage mae or wsp; presets from model.preset)")
    p.add_argument("--batch-size", type=int, default=256, help="batch of the measured steps (GPU)")
    p.add_argument("--count-batch", type=int, default=8, help="B of the (2B - B) / B traffic count")
    p.add_argument("--num-classes", type=int, default=30000, help="WSP head (hashtag vocabulary) size")
    p.add_argument("--variants", default=",".join(VARIANTS), help=f"subset of {VARIANTS}")
    p.add_argument("--measure", choices=("auto", "yes", "no"), default="auto",
                   help="time real steps (auto: on a GPU only)")
    p.add_argument("--steps", type=int, default=10, help="timed steps per measured variant")
    p.add_argument("--warmup", type=int, default=3)
    p.add_argument("--checkpoint", default="none,selective,full",
                   help=f"activation-checkpoint modes of the ours variants (from {CHECKPOINT_MODES}); official: none")
    p.add_argument("--fit", action="store_true",
                   help="also write the computed largest-batch table (every preset and --fit-stages) to --fit-out")
    p.add_argument("--fit-stages", default=",".join(FIT_STAGES),
                   help=f"stages of the fit table, from {FIT_STAGES} (finetune: at 224, 448 and 512 / 518 px)")
    p.add_argument("--fit-presets", default=",".join(FIT_PRESETS),
                   help="presets of the fit table, each at its DP world ("
                   + ", ".join(f"{k}: {v}" for k, v in FIT_PRESETS.items()) + " GPUs)")
    p.add_argument("--fit-finetune-classes", type=int, default=1000, help="fine-tune head size of the fit table")
    p.add_argument("--fit-out", default=default_out("fit.json"), help="JSON file of the fit table ('' = none; the repository's: benchmarks/results/fit.json)")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--compile-backend", default=None,
                   help="dynamo backend of the compile variants (default: $MAWS_COMPILE_BACKEND, else inductor)")
    p.add_argument("--out", default=default_out("step.json"),
                   help="JSON file to append to, relative to the current directory ('' = none)")


def _bf16_weights(model: torch.nn.Module) -> None:
    """Cast parameters in place, keeping the Parameter objects (fake tensors cannot be swapped)."""
    for p in model.parameters():
        p.data = p.data.to(torch.bfloat16)


def _model(stage: str, preset: str, variant: str, num_classes: int, cast: bool = True,
           checkpoint: str = "none") -> torch.nn.Module:
    """The variant's model; ``cast`` = False leaves ours in fp32 for an engine to make the bf16 copy."""
    cfg = model_preset(preset)
    if variant.startswith("official"):
        return OfficialMAE(cfg) if stage == "mae" else OfficialViT(cfg, num_classes)
    # WSP as trained: a learned pos_embed (wsp.pos_embed's default)
    model = (build_mae(cfg, norm_pix_loss=True) if stage == "mae"
             else build_classifier(cfg, num_classes, pos_embed_learnable=True))
    model.set_kernel_backend("triton")  # the GPU path (counted by its launches on a CPU)
    model.set_attn_backend("triton")
    if variant == "ours eager" and cast:
        _bf16_weights(model)
    set_block_options(model, checkpoint)
    return model


def _loss_fn(stage: str, variant: str, model, imgs, target, device_type: str) -> Callable[[], torch.Tensor]:
    amp = torch.autocast(device_type, dtype=torch.bfloat16)

    def loss():
        with amp:
            if stage == "mae":
                return model(imgs)[0]
            if variant.startswith("official"):
                return soft_target_cross_entropy(model(imgs).float(), target)
            return wsp_loss(model, imgs, target)
    return loss


def _inputs(stage: str, preset: str, batch: int, num_classes: int, device) -> tuple[torch.Tensor, torch.Tensor | None]:
    cfg = model_preset(preset)
    imgs = torch.randn(batch, cfg.in_chans, cfg.img_size, cfg.img_size, device=device)
    target = torch.softmax(torch.randn(batch, num_classes, device=device), -1) if stage == "wsp" else None
    return imgs, target


def _count_build(stage: str, preset: str, variant: str, num_classes: int, checkpoint: str = "none"):
    """What :func:`maws_fast.bench.traffic.per_image` counts: the model (built in the fake mode) and
    a loss over a batch of any size."""
    def build():
        model = _model(stage, preset, variant, num_classes, checkpoint=checkpoint)

        def make(b):
            imgs, target = _inputs(stage, preset, b, num_classes, "cpu")
            return _loss_fn(stage, variant, model, imgs, target, "cpu")
        return make
    return build


def count_variant(stage: str, preset: str, variant: str, num_classes: int, batch: int,
                  checkpoint: str = "none") -> dict:
    """Counted traffic of one eager variant and its roofline predictions (fake tensors, any machine).

    ``saved_mb_per_img``: the storages the forward leaves alive for backward (``live_bytes``: in
    every checkpointing mode; autograd's saved-tensor hooks see nothing inside a checkpointed block).
    """
    r = per_image(_count_build(stage, preset, variant, num_classes, checkpoint), batch)
    flops = flops_per_image(model_preset(preset), stage, num_classes)
    row = {"mem_mb_per_img": round(r.bytes / 1e6, 2), "gemm_gflop_per_img": round(r.gemm_flops / 1e9, 2),
           "attn_gflop_per_img": round(r.attn_flops / 1e9, 3), "saved_mb_per_img": round(r.live_bytes / 1e6, 2),
           "model_gflop_per_img": round(flops / 1e9, 2),
           "top_ops_mb": {k: round(v / 1e6, 2) for k, v in list(r.bytes_by_op.items())[:8]}}
    for dev, (tf, bw) in DEVICES.items():
        ips = 1.0 / r.seconds(tf, bw)
        row[f"pred_{dev.lower()}_img_s"] = round(ips)
        row[f"pred_{dev.lower()}_mfu"] = round(flops * ips / (tf * 1e12), 4)
    return row


def measure_variant(stage: str, preset: str, variant: str, num_classes: int, batch: int, device: torch.device,
                    steps: int, warmup: int, checkpoint: str = "none", backend_name: str | None = None) -> dict:
    """Time full training steps (forward, backward, AdamW) of one variant on real tensors.

    At least one warm-up step runs before the timed ones and before the peak-memory window opens:
    compiling and autotuning are not a step's time or memory. A compile variant compiles from
    empty dynamo caches (each variant is a new model; see :mod:`maws_fast.train.regional_compile`)
    and its row counts the graphs it compiled."""
    from maws_fast.config import ParallelConfig, RunConfig
    from maws_fast.parallel.engine import AdamWSpec
    from maws_fast.parallel.mesh import single_process
    from maws_fast.train.optim import param_groups
    from maws_fast.train.parallelize import parallelize
    from maws_fast.train.regional_compile import compile_scope

    backend = compile_backend(backend_name) if variant in MEASURED_ONLY else None
    model = _model(stage, preset, variant, num_classes, cast=False).to(device)
    if device.type != "cuda" and not variant.startswith("official"):
        model.set_kernel_backend(None)  # the interpreter is a correctness tool: CPU runs check the code path
        model.set_attn_backend("sdpa")
    imgs, target = _inputs(stage, preset, batch, num_classes, device)
    with ExitStack() as scope:
        if variant.startswith("official"):
            opt = torch.optim.AdamW(model.parameters(), lr=1e-4, betas=(0.9, 0.95), weight_decay=0.05,
                                    **({"fused": True} if device.type == "cuda" else {}))
            fwd = model
            if variant == "official compile":
                import torch._dynamo as dynamo

                dynamo.reset()  # a new model: its graphs only, within dynamo's recompile limit
                fwd = torch.compile(model, backend=backend)
            loss_fn = _loss_fn(stage, variant, fwd, imgs, target, device.type)

            def step():
                opt.zero_grad(set_to_none=True)
                loss_fn().backward()
                opt.step()
        else:
            objective = MAEObjective(model, 0.75, seed=0) if stage == "mae" else WSPObjective(model)
            param_dtype = "fp32" if variant == "ours eager (autocast)" else "bf16"  # bf16: the engine makes the model copy
            parallel = ParallelConfig(engine="ours", zero_stage=0, param_dtype=param_dtype)
            run = RunConfig(activation_checkpoint=checkpoint, compile=variant == "ours compile")
            # as the loop: dynamo's caches and recompile limit scoped to this model, parallelize inside the scope
            compiled = scope.enter_context(compile_scope(f"{stage} {preset} {variant} ckpt {checkpoint}", model,
                                                         run.compile, backend=backend))
            engine = parallelize(objective, single_process(), parallel, run,
                                 AdamWSpec.of(model, param_groups(model, 0.05), betas=(0.9, 0.95)), device,
                                 compiled=compiled)
            amp = torch.autocast(device.type, dtype=torch.bfloat16)

            def step():
                engine.zero_grad()
                with amp:
                    loss = engine.objective(imgs, target, 0)
                engine.backward(loss)
                engine.step(1e-4, None)
        start = compile_counts()
        for _ in range(max(warmup, 1)):
            step()
        window = peak_memory(device)
        if window is not None:
            window.open()
        sec = time_steps(step, steps, 0, device)
    ips = batch / sec
    flops = flops_per_image(model_preset(preset), stage, num_classes)
    peak = peak_tflops(env_info()["device"])
    row = {"ms_per_step": round(sec * 1e3, 3), "img_s": round(ips, 1),
           "mfu": round(ips * flops / (peak * 1e12), 4) if peak and device.type == "cuda" else None,
           "peak_mem_gb": round(window.peak() / 2**30, 2) if window is not None else None}
    if variant in MEASURED_ONLY:
        graphs, breaks = (now - then for now, then in zip(compile_counts(), start))
        row.update(compile_backend=str(backend), compiled_graphs=graphs, graph_breaks=breaks)
    return row



def _parse_cases(text: str) -> list[tuple[str, str]]:
    out = []
    for item in [c for c in text.split(",") if c]:
        stage, _, preset = item.partition(":")
        if stage not in ("mae", "wsp") or preset not in PRESETS:
            raise ConfigError(f"maws-bench step: bad case {item!r}; write stage:preset with stage mae or wsp and a "
                              f"preset from {sorted(PRESETS)}")
        out.append((stage, preset))
    return out


def bench_step(args: argparse.Namespace) -> list[dict]:
    cases = _parse_cases(args.cases)
    variants = [v for v in args.variants.split(",") if v]
    bad = [v for v in variants if v not in VARIANTS]
    if bad:
        raise ConfigError(f"maws-bench step: unknown variant(s) {bad}; choose from {VARIANTS}")
    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("maws-bench step: --device cuda but torch sees no CUDA device")
    measure = args.measure == "yes" or (args.measure == "auto" and device.type == "cuda")
    modes = [m for m in args.checkpoint.split(",") if m]
    if not modes or any(m not in CHECKPOINT_MODES for m in modes):
        raise ConfigError(f"maws-bench step: --checkpoint {args.checkpoint!r}; choose a subset of {CHECKPOINT_MODES}")
    fit_stages, fit_presets = _fit_args(args) if args.fit else ([], {})
    if measure and any(v in MEASURED_ONLY for v in variants):
        compile_backend(args.compile_backend)  # a misspelt backend is one error here, not a failed row per variant
    info, rows = env_info(), []
    # each row reaches the file the moment it is measured: a variant that fails, or a kill, keeps the rest
    out = ResultsFile(args.out, "maws-bench step")
    for stage, preset in cases:
        base: dict = {}
        case_rows = []
        for variant in variants:
            if variant in MEASURED_ONLY and not measure:
                continue  # nothing to count or time: a row would be empty
            for mode in (["none"] if variant.startswith("official") or variant == "ours eager (autocast)" else modes):
                row = {"bench": "step", "stage": stage, "preset": preset, "variant": variant,
                       "activation_checkpoint": mode, "batch_size": args.batch_size, "count_batch": args.count_batch,
                       **info}
                try:
                    if variant not in MEASURED_ONLY:
                        row.update(count_variant(stage, preset, variant, args.num_classes, args.count_batch, mode))
                    if measure:
                        row.update(measure_variant(stage, preset, variant, args.num_classes, args.batch_size, device,
                                                   args.steps, args.warmup, mode, args.compile_backend))
                except Exception as e:  # this variant's row says why; the next variant runs
                    failed(row, e)
                    print(f"{stage} {preset} {variant} ckpt {mode}: FAILED, {row['error']}")
                    if device.type == "cuda":
                        torch.cuda.empty_cache()  # what the failed variant held is not the next one's
                if variant.startswith("official") and is_measured(row):
                    base[variant] = row
                case_rows.append(out.add(row))
                _ratios(case_rows, base)  # rows written before their baseline get its ratios now
                out.save()
        rows += case_rows
    _print(rows)
    if out.path is not None:
        print(f"appended {len(rows)} rows to {out.path}")
    if args.fit:
        fit = bench_fit(args.num_classes, args.count_batch, modes, info, fit_stages, fit_presets,
                        args.fit_finetune_classes)
        if args.fit_out:
            append_results(args.fit_out, fit)
            print(f"appended {len(fit)} rows to {args.fit_out}")
    return rows


def _fit_args(args: argparse.Namespace) -> tuple[list[str], dict[str, int]]:
    """(stages, {preset: DP world}) of ``--fit-stages`` / ``--fit-presets``; a bad one is one error
    before anything is counted."""
    stages = [x for x in args.fit_stages.split(",") if x]
    if not stages or any(x not in FIT_STAGES for x in stages):
        raise ConfigError(f"maws-bench step: --fit-stages {args.fit_stages!r}; choose a subset of {FIT_STAGES}")
    presets = [x for x in args.fit_presets.split(",") if x]
    if not presets or any(x not in FIT_PRESETS for x in presets):
        raise ConfigError(f"maws-bench step: --fit-presets {args.fit_presets!r}; choose a subset of "
                          f"{list(FIT_PRESETS)}")
    if args.fit_finetune_classes < 1:
        raise ConfigError(f"maws-bench step: --fit-finetune-classes {args.fit_finetune_classes}; it must be >= 1")
    return stages, {p: FIT_PRESETS[p] for p in presets}


def _stage_config(preset: str, resolution: int) -> Config:
    """A config whose fine-tune / LiT builders make the GPU path's model of ``preset`` (Triton
    kernels and attention) with the stages' default sections, fine-tuning at ``resolution``."""
    model = model_preset(preset, attn_backend="triton", kernel_backend="triton")
    c = model.in_chans
    return Config(model=model, data=DataConfig(mean=(0.5,) * c, std=(0.5,) * c),
                  finetune=FinetuneConfig(img_size=resolution))


class _FullCaptions(torch.nn.Module):
    """:class:`~maws_fast.models.text.TextTransformer`'s forward for captions that fill the context
    (every caption ``context_length`` tokens: the count's worst case), without its two host reads
    (the empty-caption check and the packed length), which fake tensors hold no values for: the tower's
    own ``embed`` and ``encode_packed`` around the same packing copy, over the B * N packed tokens."""

    def __init__(self, tower: torch.nn.Module):
        super().__init__()
        self.tower = tower

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        B, N = ids.shape
        cu = torch.arange(0, B * N + 1, N, dtype=torch.int32, device=ids.device)  # (B + 1,)
        x, dtype = self.tower.embed(ids)
        x = x.flatten(0, 1)[torch.arange(B * N, device=ids.device)].to(dtype).unsqueeze(0)  # (1, T, W), as x[real]
        return self.tower.encode_packed(x, cu, N)


def _fit_model(stage: str, preset: str, resolution: int, num_classes: int, finetune_classes: int,
               checkpoint: str = "none") -> torch.nn.Module:
    """The network a stage of the fit table trains, as its stage builds it, on the GPU path (bf16)."""
    if stage in ("mae", "wsp"):
        return _model(stage, preset, "ours eager", num_classes, checkpoint=checkpoint)
    from maws_fast.train.finetune import build_finetune_model
    from maws_fast.train.lit import build_lit

    cfg = _stage_config(preset, resolution)
    if stage == "finetune":
        model = build_finetune_model(cfg, finetune_classes)
    else:
        model = build_lit(cfg, cfg.lit.vocab_size)
        model.text_encoder = _FullCaptions(model.text_encoder)
    _bf16_weights(model)  # an engine's bf16 copy; the locked tower cast by it too
    set_block_options(model, checkpoint)  # LiT: the text tower's blocks (the locked tower runs under no_grad)
    return model


def _fit_count_build(stage: str, preset: str, resolution: int, num_classes: int, finetune_classes: int,
                     checkpoint: str):
    """What :func:`~maws_fast.bench.traffic.per_image` counts for a row of the fit table: MAE and WSP as
    the step rows count them; the fine-tune's objective (Mixup / CutMix, drop path, the fused head and
    loss) at ``resolution``; LiT's objective on images (the locked tower's no_grad forward every step,
    as on JPEGs) and full-context captions. Images arrive in bf16, as the engine's input hook casts them."""
    if stage in ("mae", "wsp"):
        return _count_build(stage, preset, "ours eager", num_classes, checkpoint)

    def build():
        model = _fit_model(stage, preset, resolution, num_classes, finetune_classes, checkpoint)
        cfg = _stage_config(preset, resolution)
        f, lc, c = cfg.finetune, cfg.lit, cfg.model.in_chans
        if stage == "finetune":  # the stage's Mixup / CutMix, as finetune_stage builds it
            mixup = Mixup(finetune_classes, mixup_alpha=f.mixup, cutmix_alpha=f.cutmix, prob=f.mixup_prob,
                          switch_prob=f.mixup_switch_prob, label_smoothing=f.smoothing)
            objective = FinetuneObjective(model, mixup, seed=0)
        else:
            objective = LiTObjective(model, None, "triton")

        def make(b):
            imgs = torch.randn(b, c, resolution, resolution).to(torch.bfloat16)
            if stage == "finetune":
                target = torch.randint(0, finetune_classes, (b,))
            else:
                target = torch.randint(1, lc.vocab_size, (b, lc.context_length))  # no pad_id (0): full captions
            amp = torch.autocast("cpu", dtype=torch.bfloat16)

            def loss():
                with amp:
                    return objective(imgs, target, 0)
            return loss
        return make
    return build


def bench_fit(num_classes: int, count_batch: int, modes: list[str], info: dict, stages: list[str] = FIT_STAGES,
              presets: dict[str, int] | None = None, finetune_classes: int = 1000) -> list[dict]:
    """:func:`maws_fast.bench.fit.fit_rows` over ``presets`` (preset -> DP world; default
    :data:`FIT_PRESETS`) and ``stages`` at their resolutions (:func:`maws_fast.bench.fit.fit_cases`),
    our ZeRO-2 / ZeRO-3 and FSDP2, with activations counted as the step rows count them; LiT also
    with its forward's peak (:func:`maws_fast.bench.fit.forward_peak`)."""
    presets = FIT_PRESETS if presets is None else presets
    memo: dict = {}

    def build(stage: str, preset: str, resolution: int, mode: str):
        return _fit_count_build(stage, preset, resolution, num_classes, finetune_classes, mode)

    def acts(stage: str, preset: str, resolution: int, mode: str) -> float:
        key = (stage, preset, resolution, mode)
        if key not in memo:
            memo[key] = per_image(build(*key), count_batch).live_bytes
        return memo[key]

    def peak(stage: str, preset: str, resolution: int, mode: str) -> float | None:
        return forward_peak(build(stage, preset, resolution, mode), count_batch) if stage == "lit" else None

    rows = fit_rows(fit_cases(list(presets), stages), list(FIT_ENGINES), modes, presets, count_batch,
                    lambda stage, preset, res: _fit_model(stage, preset, res, num_classes, finetune_classes),
                    acts, peak)
    lit = LiTConfig()
    for r in rows:
        if r["stage"] == "lit":  # the text tower counted: the lit section's defaults
            r.update(text_width=lit.width, text_depth=lit.depth, context_length=lit.context_length)
        if r["stage"] == "finetune":
            r["num_classes"] = finetune_classes
        r.update(info)
    print("largest per-GPU batch, COMPUTED (counted activations + model state per rank; 10% headroom):")
    for r in rows:
        print(f"  {r['stage']:<8} {r['preset']:<10} {r['resolution']:>3} px {r['engine']:<6} N={r['world']:<3} "
              f"ckpt {r['activation_checkpoint']:<9} state {r['state_gb_per_rank']:6.1f} GB  "
              f"act {r['act_mb_per_img']:7.1f} MB/img  "
              f"80 GB: {r['max_batch_h100_80gb']:5d}  141 GB: {r['max_batch_h200_141gb']:5d}")
    for stage, preset, engine, need in FIT_GOALS:
        got = {r["activation_checkpoint"]: r["max_batch_h100_80gb"] for r in rows
               if (r["stage"], r["preset"], r["engine"]) == (stage, preset, engine)}
        if not got:
            continue  # a stage or preset left out of this table
        ok = [m for m in modes if got.get(m, 0) >= need]
        print(f"goal {stage} {preset} {engine} at N={presets[preset]}: batch {need} per 80 GB GPU "
              f"(computed max {got}): {'met with ' + ok[0] if ok else 'NOT met'}")
    return rows


def _ratios(rows: list[dict], base: dict) -> None:
    eager, comp = base.get("official eager"), base.get("official compile")
    rows = [r for r in rows if is_measured(r)]  # a failed variant's row gets no ratio and is no baseline
    plain = {r["variant"]: r for r in rows if r.get("activation_checkpoint", "none") == "none"}
    for r in rows:
        ref = plain.get(r["variant"])
        if (r.get("activation_checkpoint", "none") != "none" and ref is not None and "saved_mb_per_img" in ref
                and "saved_mb_per_img" in r):
            r["saved_vs_none"] = round(r["saved_mb_per_img"] / ref["saved_mb_per_img"], 3)
            r["gemm_flops_vs_none"] = round(r["gemm_gflop_per_img"] / ref["gemm_gflop_per_img"], 3)
        if eager and "mem_mb_per_img" in r and "mem_mb_per_img" in eager:
            r["mem_vs_official"] = round(r["mem_mb_per_img"] / eager["mem_mb_per_img"], 3)
        if eager and r.get("img_s") and eager.get("img_s"):
            r["speedup_vs_official_eager"] = round(r["img_s"] / eager["img_s"], 3)
        if comp and r.get("img_s") and comp.get("img_s"):
            r["speedup_vs_official_compile"] = round(r["img_s"] / comp["img_s"], 3)


def _print(rows: list[dict]) -> None:
    print("memory-bound MB / image counted over one eager forward + backward; img/s and MFU 'pred' are a roofline "
          "PREDICTION (GEMMs at peak, other kernels at full HBM bandwidth), not a measurement")
    for r in rows:
        parts = [f"{r['stage']} {r['preset']:<8} {r['variant']:<22} ckpt {r.get('activation_checkpoint', 'none'):<9}"]
        if "mem_mb_per_img" in r:
            parts.append(f"{r['mem_mb_per_img']:7.1f} MB/img (x{r.get('mem_vs_official', 1):.2f})  "
                         f"GEMM {r['gemm_gflop_per_img']:6.1f} GF  saved {r['saved_mb_per_img']:6.1f} MB  "
                         f"pred H100 {r['pred_h100_img_s']:6d} img/s MFU {100 * r['pred_h100_mfu']:4.1f}%  "
                         f"pred H200 {r['pred_h200_img_s']:6d} img/s")
        if not is_measured(r):
            parts.append(f"FAILED: {r['error']}")
        if r.get("compiled_graphs") is not None:
            parts.append(f"{r['compiled_graphs']} graph(s) compiled ({r['compile_backend']}), {r['graph_breaks']} break(s)")
        if r.get("img_s"):
            mfu = f" MFU {100 * r['mfu']:.1f}%" if r.get("mfu") else ""
            parts.append(f"measured {r['img_s']:.1f} img/s{mfu}"
                         + (f" x{r['speedup_vs_official_eager']:.2f} vs official eager" if r.get("speedup_vs_official_eager") else "")
                         + (f" x{r['speedup_vs_official_compile']:.2f} vs compile" if r.get("speedup_vs_official_compile") else ""))
        print("  ".join(parts))
    for r in rows:
        if r.get("activation_checkpoint") == "selective" and "saved_vs_none" in r:
            ok = r["saved_vs_none"] <= GOAL_SELECTIVE_SAVED and r["gemm_flops_vs_none"] <= GOAL_SELECTIVE_FLOPS
            print(f"goal {r['stage']} {r['preset']} {r['variant']}: selective checkpointing keeps x{r['saved_vs_none']:.2f} "
                  f"of the saved bytes (goal <= {GOAL_SELECTIVE_SAVED}) at x{r['gemm_flops_vs_none']:.3f} the GEMM FLOPs "
                  f"(goal <= {GOAL_SELECTIVE_FLOPS}): {'met' if ok else 'NOT met'}")
        if r.get("activation_checkpoint") == "full" and "saved_vs_none" in r:
            print(f"  {r['stage']} {r['preset']} {r['variant']}: full checkpointing x{r['saved_vs_none']:.2f} saved bytes, "
                  f"x{r['gemm_flops_vs_none']:.3f} GEMM FLOPs")
        if r.get("activation_checkpoint", "none") != "none":
            continue
        if r["variant"] == "ours eager" and "mem_vs_official" in r:
            ok_b = r["mem_vs_official"] <= GOAL_BYTES_RATIO
            print(f"goal {r['stage']} {r['preset']}: memory-bound bytes x{r['mem_vs_official']:.2f} of official "
                  f"(goal <= {GOAL_BYTES_RATIO}): {'met' if ok_b else 'NOT met'}; predicted H100 MFU "
                  f"{100 * r['pred_h100_mfu']:.1f}% (goal >= {100 * GOAL_MFU:.0f}% at B/16 MAE)")
        if r["variant"] == "ours eager" and r.get("speedup_vs_official_eager"):
            print(f"goal {r['stage']} {r['preset']}: measured x{r['speedup_vs_official_eager']:.2f} vs official eager "
                  f"(goal >= {GOAL_VS_EAGER}), x{r.get('speedup_vs_official_compile', float('nan')):.2f} vs its compile "
                  f"(goal >= {GOAL_VS_COMPILE})")
