"""The MAWS recipe as stages: MAE pre-pretraining -> WSP -> fine-tune -> linear probe + few-shot.

Each training stage is a :class:`~maws_fast.train.loop.Stage` handed to the shared loop; this
module says what data, model, loss and initialisation MAE and WSP use (the fine-tune's are in
:mod:`maws_fast.train.finetune`; every stage's name, init and fingerprint in :mod:`maws_fast.train.runs`),
runs the recipe and evaluates its encoders.
"""
from __future__ import annotations

import json
import uuid
from pathlib import Path
from typing import Callable

import torch

from maws_fast.config import Config, resolve_defaults
from maws_fast.data import fmnist
from maws_fast.data.demo import DemoData, load_data
from maws_fast.data.loader import check_batch, jpeg_loader
from maws_fast.data.reference import BatchLoader
from maws_fast.errors import CheckpointError, ConfigError, UserError
from maws_fast.eval.evaluate import check_eval_config, feature_sets, probe_encoder, results_table
from maws_fast.models import build_classifier, build_mae, load_encoder, load_pretrained, unwrap_state_dict
from maws_fast.models.flops import flops_per_image
from maws_fast.parallel.mesh import Mesh, all_gather_objects, destroy, init_distributed
from maws_fast.parallel.watchdog import start_watchdog, stop_watchdog
from maws_fast.seeds import Stream, mix_seed
from maws_fast.storage import acquire_run_lock, atomic_write_text, load_checkpoint, read_meta, read_weights, release_run_lock
from maws_fast.train.checkpoint import check_fingerprint
from maws_fast.train.finetune import check_finetune_config, finetune_eval, finetune_stage
from maws_fast.train.lit import check_lit_config, lit_stage, load_lit, same_weights, zero_shot, zero_shot_prompts
from maws_fast.train.loop import Stage, run_stage, say, silent
from maws_fast.train.objectives import MAEObjective, WSPObjective
from maws_fast.train.runs import check_init, data_shard, finetune_runs, fingerprints, init_path, lit_runs, wsp_runs

Echo = Callable[[str], None]


def mae_stage(cfg: Config, data: DemoData | None, device: torch.device, mesh: Mesh | None = None) -> Stage:
    torch.manual_seed(mix_seed(cfg.run.seed, Stream.MAE_INIT))  # model init: the same weights on every rank
    model = build_mae(cfg.model, norm_pix_loss=cfg.mae.norm_pix_loss).to(device)
    m = cfg.mae
    rank, dp = data_shard(mesh)
    if cfg.data.loader != "reference":
        loader = jpeg_loader(cfg, cfg.data.train, m.batch_size, m.augment.crop_scale, m.augment.flip_p, "none",
                             device, shard=(rank, dp), log=say)
    else:
        check_batch(m.batch_size, dp, cfg.parallel.grad_accum)
        loader = BatchLoader(
            data.train_x, None, m.batch_size, cfg.run.seed, cfg.data.mean, cfg.data.std,
            augment={"out_size": cfg.model.img_size, "scale": m.augment.crop_scale, "flip_p": m.augment.flip_p},
            num_workers=cfg.data.num_workers, shard=(rank, dp),
        )
    objective = MAEObjective(model, m.mask_ratio, cfg.run.seed, rank, dp)
    return Stage("mae", objective, loader, m, flops_per_image(cfg.model, "mae", mask_ratio=m.mask_ratio),
                 fingerprints(cfg)["mae"])


def wsp_stage(cfg: Config, data: DemoData | None, device: torch.device, name: str, init: str,
              mesh: Mesh | None = None) -> Stage:
    w = cfg.wsp
    rank, dp = data_shard(mesh)
    if cfg.data.loader != "reference":
        loader = jpeg_loader(cfg, cfg.data.wsp_train or cfg.data.train, w.batch_size, w.augment.crop_scale,
                             w.augment.flip_p, "tags", device, shard=(rank, dp), log=say)
        num_tags = loader.source.num_classes
    else:
        check_batch(w.batch_size, dp, cfg.parallel.grad_accum)
        loader = BatchLoader(
            data.wsp_x, fmnist.tag_targets(data.wsp_tags), w.batch_size, cfg.run.seed, cfg.data.mean, cfg.data.std,
            augment={"out_size": cfg.model.img_size, "scale": w.augment.crop_scale, "flip_p": w.augment.flip_p},
            num_workers=cfg.data.num_workers, shard=(rank, dp),
        )
        num_tags = len(fmnist.VOCAB)
    torch.manual_seed(mix_seed(cfg.run.seed, Stream.WSP_INIT))  # same head / encoder init for every WSP variant
    model = build_classifier(cfg.model, num_classes=num_tags).to(device)

    def init_fn() -> str | None:
        if init == "scratch":
            return "encoder initialised from scratch (random init)"
        path = init_path(cfg, init)
        if not path.exists():
            hint = ("run the mae stage first (--run.stages=[mae,wsp,linprobe]) or set --wsp.init=scratch"
                    if init == "mae" else "point --wsp.init at an MAE or ViT checkpoint")
            raise CheckpointError(f"wsp.init={init!r} needs {path}, which does not exist; {hint}")
        report = load_encoder(model, read_weights(path), str(path), new=("head.weight", "head.bias"),
                              hint="--wsp.init must point at an MAE or ViT checkpoint of this model config")
        return f"encoder initialised from {path}: {report.summary()}"

    fp = fingerprints(cfg)["wsp_scratch" if init == "scratch" else "wsp"]
    return Stage(name, WSPObjective(model), loader, w, flops_per_image(cfg.model, "wsp", num_tags), fp, init_fn)


# --- evaluation --------------------------------------------------------------------------------
def _probe_checkpoint(cfg: Config, feats, num_classes: int, device: torch.device, echo: Echo) -> dict:
    """``eval.init``: the probes of any checkpoint (ours, the official MAE's, MAWS's, timm's) on
    ``cfg.model``'s architecture; a checkpoint with ``fc_norm`` and no ``norm`` is pooled as it was
    trained (patch-token mean + fc_norm), any other by its cls token after ``norm``."""
    path = Path(cfg.eval.init)
    sd = unwrap_state_dict(read_weights(path))
    pool = "avg" if "fc_norm.weight" in sd and "norm.weight" not in sd else "token"
    # learnable: a trained table (MAWS, timm, fine-tunes) is kept, resampled if the grid differs
    model = build_classifier(cfg.model, num_classes=0, global_pool=pool, pos_embed_learnable=True).to(device)
    report = load_encoder(model, {k: v for k, v in sd.items() if not k.startswith("head.")}, str(path),
                          hint="set --model.preset (and img_size / patch_size) to the checkpoint's architecture")
    echo(f"[linprobe] {path}: {report.summary()} ({pool} pooling)")
    return {"model": str(path), "stage": "eval.init", "train_steps": "-",
            **probe_encoder(cfg, model, feats, num_classes)}


def _evaluate_clip(cfg: Config, data: DemoData | None, feats, num_classes: int, device: torch.device,
                   echo: Echo) -> dict:
    """``eval.clip``: a released MAWS CLIP checkpoint's zero-shot accuracy and its image tower's probes."""
    from maws_fast.models.maws_clip import load_maws_clip, load_xlmr_tokenizer, xlmr_ids

    path = Path(cfg.eval.clip)
    model = load_maws_clip(path, device)
    v, m = model.vision_encoder, cfg.model
    got = (v.patch_embed.img_size[0], v.patch_size, v.in_chans, v.embed_dim)
    want = (m.img_size, m.patch_size, m.in_chans, m.embed_dim)
    if got != want:
        raise ConfigError(f"config: model: {path} is a ViT of img_size / patch_size / in_chans / embed_dim {got}, but the "
                          f"config says {want}; set --model.preset (e.g. vit_b16) and --data.mean / --data.std to the "
                          "checkpoint's (MAWS: 224 px, ImageNet mean and std)")
    tok = load_xlmr_tokenizer(cfg.eval.clip_tokenizer)
    classnames, templates = zero_shot_prompts(cfg, data)
    f_test, y_test = feats(v, "test")
    acc = zero_shot(model, lambda xs: xlmr_ids(tok, xs), f_test, y_test, classnames, templates, device)
    row = {"model": f"{path.name} (MAWS CLIP)", "stage": "eval.clip", "train_steps": "-",
           **probe_encoder(cfg, v, feats, num_classes), **acc}
    echo(f"[linprobe] {row['model']}: zero-shot top-1 {100 * acc['zero_shot_top1']:.2f}%, top-5 "
         f"{100 * acc['zero_shot_top5']:.2f}% on "
         f"{len(y_test)} images ({len(templates)} prompts per class), linear probe {100 * row['linear_probe_top1']:.2f}%")
    return row


def evaluate(cfg: Config, data: DemoData | None, device: torch.device, echo: Echo) -> list[dict]:
    """Linear probe and k-shot on frozen cls features of every finished encoder of this run (or of
    the one checkpoint ``eval.init`` names)."""
    out = Path(cfg.run.out_dir)
    candidates = [(name, label) for name, _, label in wsp_runs(cfg)] + [("mae", "MAE only (no WSP)")]
    prints = fingerprints(cfg)
    feats, num_classes = feature_sets(cfg, data, device, log=say)
    memo: dict = {}

    def feats_once(model, split):  # an encoder's features serve its probes and its LiT run's zero-shot
        if (id(model), split) not in memo:
            memo[id(model), split] = (model, feats(model, split))
        return memo[id(model), split][1]

    if cfg.eval.clip is not None:
        return [_evaluate_clip(cfg, data, feats, num_classes, device, echo)]
    if cfg.eval.init is not None:
        row = _probe_checkpoint(cfg, feats, num_classes, device, echo)
        echo(f"[linprobe] {row['model']}: linear probe {100 * row['linear_probe_top1']:.2f}%"
             + "".join(f", {k}-shot {100 * row[f'{k}shot_top1_mean']:.2f}%" for k in cfg.eval.shots))
        return [row]
    rows, encoders = [], {}
    for name, label in candidates:
        final = out / name / "final"
        if not final.exists():
            continue
        tensors, meta, _ = load_checkpoint(final)
        check_fingerprint(meta.get("fingerprint", {}), prints[name], final)
        model = build_classifier(cfg.model, num_classes=0).to(device)
        report = load_pretrained(model, tensors, source=str(final))
        if report.initialised:
            raise CheckpointError(f"{final} lacks encoder tensors {report.initialised[:4]}; it cannot be evaluated")
        steps = f"{name.split('_')[0]} {meta['step']}"
        if name == "wsp" and cfg.wsp.init == "mae":
            steps = f"mae {read_meta(out / 'mae' / 'final')['step']} + {steps}"
        encoders[name] = model
        row = {"model": label, "stage": name, "train_steps": steps, **probe_encoder(cfg, model, feats_once, num_classes)}
        echo(f"[linprobe] {label}: linear probe {100 * row['linear_probe_top1']:.2f}%"
             + "".join(f", {k}-shot {100 * row[f'{k}shot_top1_mean']:.2f}%" for k in cfg.eval.shots))
        rows.append(row)
    if not rows:
        raise UserError(f"nothing to evaluate under {out}: run the mae and wsp stages first")
    _attach_finetunes(cfg, rows)
    _attach_zero_shot(cfg, data, rows, encoders, feats_once, device, echo)
    return rows


def _attach_zero_shot(cfg: Config, data: DemoData | None, rows: list[dict], encoders: dict, feats, device: torch.device,
                      echo: Echo) -> None:
    """Each finished LiT run's zero-shot top-1 / top-5 on the test split, next to the probe numbers of
    the encoder it locked (its test features reused when the tower's weights are that encoder's)."""
    if "lit" not in cfg.run.stages:
        return
    by_stage = {r["stage"]: r for r in rows}
    classnames, templates = zero_shot_prompts(cfg, data)
    for name, init, label in lit_runs(cfg):
        if not (Path(cfg.run.out_dir) / name / "final").exists():
            continue
        model, tok, meta = load_lit(cfg, name, device)
        enc = encoders.get(init)
        tower = enc if enc is not None and same_weights(model.vision_encoder, enc) else model.vision_encoder
        f_test, y_test = feats(tower, "test")
        res = zero_shot(model, tok.encode, f_test, y_test, classnames, templates, device)
        echo(f"[linprobe] {label}: zero-shot top-1 {100 * res['zero_shot_top1']:.2f}%, top-5 "
             f"{100 * res['zero_shot_top5']:.2f}% on {len(y_test)} test images ({len(templates)} prompts per class)")
        row = by_stage.get(init)
        if row is None:
            row = {"model": label, "stage": name, "train_steps": "-"}
            rows.append(row)
        row.update(res, lit_steps=meta["step"])


def _attach_finetunes(cfg: Config, rows: list[dict]) -> None:
    """Each finished fine-tune's top-1 / top-5 next to the probe numbers of the encoder it started
    from; a fine-tune of an outside checkpoint gets a row of its own."""
    if "finetune" not in cfg.run.stages:
        return
    by_stage = {r["stage"]: r for r in rows}
    for name, init, label in finetune_runs(cfg):
        f = Path(cfg.run.out_dir) / name / "eval.json"
        if not f.exists():
            continue
        res = json.loads(f.read_text())
        row = by_stage.get(init)
        if row is None:
            row = {"model": label, "stage": name, "train_steps": "-"}
            rows.append(row)
        row.update(finetune_top1=res["top1"], finetune_top5=res["top5"], finetune_steps=res["step"])


# --- the whole recipe ----------------------------------------------------------------------------
def check_out_dir(path: str | Path) -> Path:
    """Create the output directory and prove it is writable, before any work is done."""
    p = Path(path)
    probe = p / f".write-test-{uuid.uuid4().hex[:8]}"
    try:
        p.mkdir(parents=True, exist_ok=True)
        probe.write_text("ok")
        probe.unlink()
    except OSError as e:
        raise UserError(f"output directory {p} is not writable ({e.strerror or e}); pass --run.out_dir=DIR "
                        f"pointing at a writable directory") from None
    return p


def run_recipe(cfg: Config, echo: Echo = say) -> dict:
    """Run the configured stages in order; returns {"stages": {...}, "results": [...]}.

    Under torchrun every process runs this; they train together (cfg.parallel), rank 0 logs,
    writes the final weights and runs the evaluation.
    """
    out = check_out_dir(cfg.run.out_dir)
    device = torch.device(cfg.run.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("config: run.device: cuda requested but torch sees no CUDA device; use --run.device=cpu")
    if cfg.run.threads > 0:
        torch.set_num_threads(cfg.run.threads)
    mesh = init_distributed(tp=cfg.parallel.tp, device=device, backend=cfg.parallel.backend,
                            timeout_s=cfg.parallel.timeout_s)
    lock, dog = None, None
    try:
        dog = start_watchdog(cfg.parallel.stall_timeout_s, mesh.rank, mesh.dims.world)
        lock = _lock_out_dir(out, mesh, echo)
        if mesh.distributed and device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (LOCAL_RANK)
        if mesh.rank != 0:
            echo = silent  # one log, from rank 0
        cfg, chosen = resolve_defaults(cfg, mesh.dims.dp)
        for line in chosen:
            echo(f"[defaults] {line}")
        if device.type == "cuda" and cfg.run.tf32:
            torch.set_float32_matmul_precision("high")  # TF32 tensor cores for fp32 matmuls
            torch.backends.cudnn.allow_tf32 = True
        return _run_stages(cfg, out, device, mesh, echo)
    finally:
        if lock is not None:
            release_run_lock(lock)
        stop_watchdog(dog)
        destroy()


def _lock_out_dir(out: Path, mesh: Mesh, echo: Echo) -> Path | None:
    """Rank 0 takes the output directory's lock (one job per out_dir); every rank raises the same
    error when it cannot, so no rank waits for the others. Returns the lock on rank 0."""
    lock, err = None, None
    if mesh.rank == 0:
        try:
            lock = acquire_run_lock(out, echo)
        except UserError as e:
            err = str(e)
    errs = [e for e in all_gather_objects(err, mesh) if e]
    if errs:
        raise UserError(errs[0])
    return lock


def _run_stages(cfg: Config, out: Path, device: torch.device, mesh: Mesh, echo: Echo) -> dict:
    main = mesh.rank == 0
    if main:
        atomic_write_text(out / "config.json", cfg.to_json())
    data = load_data(cfg)
    # Everything that can be checked before hours of training is checked here.
    if "linprobe" in cfg.run.stages:
        check_eval_config(cfg, data)
        if cfg.eval.init is not None:
            check_init("eval.init", cfg.eval.init, ())
        if cfg.eval.clip is not None:
            check_init("eval.clip", cfg.eval.clip, ())
    if "wsp" in cfg.run.stages:
        check_init("wsp.init", cfg.wsp.init, ("mae",))
    if "finetune" in cfg.run.stages:
        check_finetune_config(cfg, data)
    if "lit" in cfg.run.stages:
        check_lit_config(cfg, data)
        check_init("lit.init", cfg.lit.init, ("mae", "wsp", "wsp_scratch"))
    summary: dict = {"stages": {}, "results": []}
    train = dict(parallel=cfg.parallel, mesh=mesh, echo=echo)
    if "mae" in cfg.run.stages:
        summary["stages"]["mae"] = str(run_stage(mae_stage(cfg, data, device, mesh), out, cfg.run, device, **train))
    if "wsp" in cfg.run.stages:
        for name, init, _ in wsp_runs(cfg):
            stage = wsp_stage(cfg, data, device, name, init, mesh)
            summary["stages"][name] = str(run_stage(stage, out, cfg.run, device, **train))
    if "finetune" in cfg.run.stages:
        for name, init, _ in finetune_runs(cfg):
            stage = finetune_stage(cfg, data, device, name, init, mesh)
            summary["stages"][name] = str(run_stage(stage, out, cfg.run, device, **train))
        if main:  # after every fine-tune has trained: the other ranks never wait on rank 0 mid-recipe
            for name, _, label in finetune_runs(cfg):
                row = finetune_eval(cfg, data, device, name)
                echo(f"[{name}] {label}: top-1 {100 * row['top1']:.2f}%, top-5 {100 * row['top5']:.2f}% "
                     f"on {row['num_test']} held-out images")
    if "lit" in cfg.run.stages:
        for name, init, _ in lit_runs(cfg):
            stage = lit_stage(cfg, data, device, name, init, out, mesh, write=main)
            summary["stages"][name] = str(run_stage(stage, out, cfg.run, device, **train))
    if "linprobe" in cfg.run.stages and main:  # frozen-feature probes are small: rank 0 runs them alone
        rows = evaluate(cfg, data, device, echo)
        summary["results"] = rows
        atomic_write_text(out / "results.json", json.dumps(rows, indent=2))
        table = results_table(rows, cfg.eval.shots)
        atomic_write_text(out / "results.md", table + "\n")
        echo("\n" + table)
    return summary
