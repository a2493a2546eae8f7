"""The MAWS recipe as stages: MAE pre-pretraining -> WSP -> linear probe + few-shot.

Each training stage is a :class:`~maws_fast.train.loop.Stage` handed to the shared loop; this
module only says what data, model, loss and initialisation each stage uses.
"""
from __future__ import annotations

import dataclasses
import json
import uuid
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch

from maws_fast.config import Config
from maws_fast.data import fmnist
from maws_fast.data.reference import BatchLoader, mix_seed
from maws_fast.errors import CheckpointError, ConfigError, DataError, UserError
from maws_fast.eval.features import extract_features
from maws_fast.eval.fewshot import fewshot
from maws_fast.eval.linear_probe import linear_probe
from maws_fast.models import build_classifier, build_mae, load_pretrained
from maws_fast.models.flops import flops_per_image
from maws_fast.train.checkpoint import atomic_write_text, load_checkpoint, load_tensors, read_meta
from maws_fast.parallel.mesh import Mesh, destroy, init_distributed
from maws_fast.train.loop import Stage, check_fingerprint, run_stage, say
from maws_fast.train.objectives import MAEObjective, WSPObjective, wsp_loss  # noqa: F401  (wsp_loss: public here too)

Echo = Callable[[str], None]


@dataclass
class DemoData:
    """Fashion-MNIST splits plus the weak-hashtag mosaics made from the train split."""

    train_x: torch.Tensor  # (N, 28, 28) uint8
    train_y: torch.Tensor  # (N,) int64
    test_x: torch.Tensor
    test_y: torch.Tensor
    wsp_x: torch.Tensor  # (M, 28, 28) uint8 mosaics
    wsp_tags: torch.Tensor  # (M, V) multi-hot


def load_data(cfg: Config) -> DemoData | None:
    """Load Fashion-MNIST and build the WSP hashtag set (deterministic in run.seed).

    None when no stage needs it: JPEG loaders train from data.train, and there is no linprobe.
    """
    jpeg = cfg.data.loader != "reference"
    if cfg.data.dataset != "fmnist" or (jpeg and "linprobe" not in cfg.run.stages):
        return None
    if cfg.model.img_size != 28 or cfg.model.in_chans != 1:
        raise ConfigError(
            f"config: model.img_size/in_chans: Fashion-MNIST is 28x28 grey; got {cfg.model.img_size}x"
            f"{cfg.model.img_size} with {cfg.model.in_chans} channels (use --model.preset=tiny)"
        )
    train_x, train_y = fmnist.load_fmnist(cfg.data.root, "train")
    test_x, test_y = fmnist.load_fmnist(cfg.data.root, "test")
    w = cfg.wsp
    if jpeg:  # only the eval splits are needed
        return DemoData(train_x, train_y, test_x, test_y, train_x[:0], torch.zeros(0, len(fmnist.VOCAB)))
    wsp_x, wsp_tags = fmnist.make_weak_hashtags(train_x, train_y, w.num_samples, seed=cfg.run.seed, drop_p=w.drop_p, wrong_p=w.wrong_p)
    return DemoData(train_x, train_y, test_x, test_y, wsp_x, wsp_tags)


def _fingerprints(cfg: Config) -> dict[str, dict]:
    """The config each stage's result depends on (a changed one must not resume an old run)."""
    d = cfg.data
    data = {"dataset": d.dataset, "mean": d.mean, "std": d.std}
    if d.loader != "reference":  # another loader reads other samples in another order
        resolve = lambda p: str(Path(p).resolve()) if p else None  # noqa: E731
        data.update(loader=d.loader, format=d.format, train=resolve(d.train), wsp_train=resolve(d.wsp_train),
                    tags=resolve(d.tags), vocab=resolve(d.vocab), max_tags=d.max_tags)
    model = dataclasses.asdict(cfg.model)
    mae = {"seed": cfg.run.seed, "data": data, "model": model, "mae": dataclasses.asdict(cfg.mae)}
    wsp_cfg = {k: v for k, v in dataclasses.asdict(cfg.wsp).items() if k not in ("init", "compare_scratch")}
    wsp = {"seed": cfg.run.seed, "data": data, "model": model, "wsp": wsp_cfg}
    init = cfg.wsp.init if cfg.wsp.init in ("mae", "scratch") else str(Path(cfg.wsp.init).resolve())
    return {
        "mae": mae,
        "wsp": {**wsp, "init": init, **({"mae": mae} if init == "mae" else {})},
        "wsp_scratch": {**wsp, "init": "scratch"},
    }


def _data_shard(mesh: Mesh | None) -> tuple[int, int]:
    """(data-parallel rank, data-parallel size): which share of each global batch this process reads.

    Tensor-parallel ranks of one DP rank read the same share (every TP rank sees the same batch).
    """
    return (0, 1) if mesh is None else (mesh.dp_rank, mesh.dims.dp)


def _eval_format(path: str) -> str:
    """Labelled eval data is an image folder or shards written from one: tell them apart."""
    p = Path(path)
    return "webdataset" if (p / "manifest.json").exists() or any(p.glob("*.tar")) else "folder"


def jpeg_loader(cfg: Config, path, batch_size: int, scale, flip_p: float, targets: str, device: torch.device,
                eval_transform: bool = False, mesh: Mesh | None = None):
    """A PIL or DALI loader of JPEG data, sharded by global rank.

    Args:
        path: the data's path, or an already opened :class:`~maws_fast.data.sources.Source`.
        batch_size: the GLOBAL batch; each data-parallel rank reads batch_size / dp.
        eval_transform: resize + centre crop in source order (features) instead of augmenting.
        mesh: the process mesh (None: one process).
    """
    from maws_fast.data.batching import EvalTransform, TrainAugment
    from maws_fast.data.sources import Source, open_source

    d = cfg.data
    # Training reads this rank's shard; evaluation reads everything (features are fit in one process).
    rank, world = _data_shard(mesh) if not eval_transform else (0, 1)
    _check_batch(batch_size, world, 1 if eval_transform else cfg.parallel.grad_accum)
    source = path if isinstance(path, Source) else open_source(
        _eval_format(path) if eval_transform else d.format, path, d.tags, d.vocab)
    if targets == "tags" and source.num_classes == 0:
        raise ConfigError(f"config: data: WSP needs hashtags, but {path} has no vocabulary or classes; write shards "
                          "with their vocab (`maws-data shards ... --tags T.jsonl`) or pass --data.vocab")
    if eval_transform:
        aug = EvalTransform(cfg.model.img_size, d.eval_crop_frac)
    else:
        aug = TrainAugment(cfg.model.img_size, tuple(scale), flip_p=flip_p)
    kw = dict(batch_size=batch_size // world, seed=cfg.run.seed, mean=d.mean, std=d.std, transform=aug, targets=targets,
              rank=rank, world=world, shuffle=not eval_transform,
              channels=cfg.model.in_chans, max_bad=d.max_bad_samples, max_tags=d.max_tags, log=say)
    if d.loader == "pil":
        from maws_fast.data.pil_loader import PilLoader

        return PilLoader(source, num_workers=d.num_workers, **kw)
    from maws_fast.data.dali import DaliLoader, DaliSettings

    settings = DaliSettings(threads=d.dali_threads, hw_decoder_load=d.hw_decoder_load,
                            device_memory_padding=d.device_memory_padding, host_memory_padding=d.host_memory_padding,
                            preallocate_width_hint=d.preallocate_width_hint,
                            preallocate_height_hint=d.preallocate_height_hint, shuffle_buffer=d.shuffle_buffer,
                            output=d.dali_output)
    return DaliLoader(source, device=device, settings=settings, **kw)


def _check_batch(batch_size: int, dp: int, accum: int = 1) -> None:
    if batch_size % (dp * accum):
        raise ConfigError(f"config: batch_size {batch_size} does not divide over {dp} data-parallel ranks (world / "
                          f"parallel.tp) x {accum} micro-batches (parallel.grad_accum); use a multiple of {dp * accum}")


def mae_stage(cfg: Config, data: DemoData | None, device: torch.device, mesh: Mesh | None = None) -> Stage:
    torch.manual_seed(mix_seed(cfg.run.seed, 11))  # model init: the same weights on every rank
    model = build_mae(cfg.model, norm_pix_loss=cfg.mae.norm_pix_loss).to(device)
    m = cfg.mae
    rank, dp = _data_shard(mesh)
    if cfg.data.loader != "reference":
        loader = jpeg_loader(cfg, cfg.data.train, m.batch_size, m.crop_scale, m.flip_p, "none", device, mesh=mesh)
    else:
        _check_batch(m.batch_size, dp, cfg.parallel.grad_accum)
        loader = BatchLoader(
            data.train_x, None, m.batch_size, cfg.run.seed, cfg.data.mean, cfg.data.std,
            augment={"out_size": cfg.model.img_size, "scale": m.crop_scale, "flip_p": m.flip_p},
            num_workers=cfg.data.num_workers, shard=(rank, dp),
        )
    objective = MAEObjective(model, m.mask_ratio, cfg.run.seed, rank, dp)
    return Stage("mae", objective, loader, m, flops_per_image(cfg.model, "mae", mask_ratio=m.mask_ratio),
                 _fingerprints(cfg)["mae"])


def _mae_weights_path(cfg: Config, init: str) -> Path:
    if init == "mae":
        return Path(cfg.run.out_dir) / "mae" / "final" / "model.safetensors"
    return Path(init)


def wsp_stage(cfg: Config, data: DemoData | None, device: torch.device, name: str, init: str,
              mesh: Mesh | None = None) -> Stage:
    w = cfg.wsp
    rank, dp = _data_shard(mesh)
    if cfg.data.loader != "reference":
        loader = jpeg_loader(cfg, cfg.data.wsp_train or cfg.data.train, w.batch_size, w.crop_scale, w.flip_p, "tags",
                             device, mesh=mesh)
        num_tags = loader.source.num_classes
    else:
        _check_batch(w.batch_size, dp, cfg.parallel.grad_accum)
        loader = BatchLoader(
            data.wsp_x, fmnist.tag_targets(data.wsp_tags), w.batch_size, cfg.run.seed, cfg.data.mean, cfg.data.std,
            augment={"out_size": cfg.model.img_size, "scale": w.crop_scale, "flip_p": w.flip_p},
            num_workers=cfg.data.num_workers, shard=(rank, dp),
        )
        num_tags = len(fmnist.VOCAB)
    torch.manual_seed(mix_seed(cfg.run.seed, 12))  # same head / encoder init for every WSP variant
    model = build_classifier(cfg.model, num_classes=num_tags).to(device)

    def init_fn() -> str | None:
        if init == "scratch":
            return "encoder initialised from scratch (random init)"
        path = _mae_weights_path(cfg, init)
        if not path.exists():
            hint = ("run the mae stage first (--run.stages=[mae,wsp,linprobe]) or set --wsp.init=scratch"
                    if init == "mae" else "point --wsp.init at an MAE model.safetensors")
            raise CheckpointError(f"wsp.init={init!r} needs {path}, which does not exist; {hint}")
        report = load_pretrained(model, load_tensors(path), source=str(path))
        missing = [k for k in report.initialised if not k.startswith("head.")]
        if missing:
            # A file that fits nothing would silently train from scratch under an "MAE -> WSP" label.
            raise CheckpointError(f"{path} lacks encoder tensors {missing[:6]} ({len(missing)} in all); "
                                  f"--wsp.init must point at an MAE or ViT model.safetensors of this model config")
        return f"encoder initialised from {path}: {report.summary()}"

    fp = _fingerprints(cfg)["wsp_scratch" if init == "scratch" else "wsp"]
    return Stage(name, WSPObjective(model), loader, w, flops_per_image(cfg.model, "wsp", num_tags), fp, init_fn)


def wsp_runs(cfg: Config) -> list[tuple[str, str, str]]:
    """(stage name, init, table label) of every WSP model this config trains."""
    label = {"mae": "MAE -> WSP", "scratch": "WSP (random init)"}.get(cfg.wsp.init, f"{cfg.wsp.init} -> WSP")
    runs = [("wsp", cfg.wsp.init, label)]
    if cfg.wsp.compare_scratch and cfg.wsp.init != "scratch":
        runs.append(("wsp_scratch", "scratch", "WSP (random init)"))
    return runs


# --- evaluation --------------------------------------------------------------------------------
def eval_subset(cfg: Config, data: DemoData) -> tuple[torch.Tensor, torch.Tensor]:
    """The fixed random subset of the train split whose frozen features fit the probes."""
    g = torch.Generator().manual_seed(mix_seed(cfg.run.seed, 13))
    n = len(data.train_y) if cfg.eval.train_subset == 0 else min(cfg.eval.train_subset, len(data.train_y))
    sub = torch.randperm(len(data.train_y), generator=g)[:n]
    return data.train_x[sub], data.train_y[sub]


def check_eval_fits(cfg: Config, data: DemoData) -> None:
    """Fail before any training if k-shot cannot draw k examples of every class from the subset."""
    _, y = eval_subset(cfg, data)
    least = int(torch.bincount(y, minlength=10).min())
    k = max(int(s) for s in cfg.eval.shots)
    if least < k:
        raise ConfigError(f"config: eval.shots: {k}-shot needs {k} images per class but eval.train_subset="
                          f"{cfg.eval.train_subset} holds only {least} of some class; raise eval.train_subset")


def _feature_sets(cfg: Config, data: DemoData | None, device: torch.device):
    """``(feats(model, "train" | "test") -> (features, labels), num_classes)`` of the eval data.

    Fashion-MNIST (the in-memory splits, train_subset of train) or, for dataset=jpeg, the
    labelled data.eval_train / data.eval_val through the loader's eval transform.
    """
    e = cfg.eval
    if data is not None:
        sets = {"train": eval_subset(cfg, data), "test": (data.test_x, data.test_y)}

        def feats(model, split):
            x, y = sets[split]
            loader = BatchLoader(x, None, e.batch_size, cfg.run.seed, cfg.data.mean, cfg.data.std,
                                 drop_last=False, shuffle=False)
            return extract_features(model, loader.epoch(0), device=device), y

        return feats, 10

    from maws_fast.data.sources import open_source

    d = cfg.data
    paths = {"train": d.eval_train, "test": d.eval_val}
    # Listed once: every encoder of the run is evaluated on the same two sources.
    sources = {k: open_source(_eval_format(p), p, d.tags, d.vocab) for k, p in paths.items()}

    def feats(model, split):
        loader = jpeg_loader(cfg, sources[split], e.batch_size, None, 0.0, "label", device, eval_transform=True)
        labels: list[torch.Tensor] = []

        def batches():  # features and labels from one pass
            for x, y in loader.epoch(0):
                if (y < 0).any():
                    raise DataError(f"{paths[split]} has images without a class label; evaluation data must be an "
                                    "image folder or shards written from one (`maws-data shards --folder`)")
                labels.append(y.cpu())
                yield x, y

        try:
            f = extract_features(model, batches(), device=device)
        finally:
            if hasattr(loader, "close"):
                loader.close()  # its reader thread and DALI pipelines (nvJPEG buffers on a GPU)
        return f, torch.cat(labels)

    num_classes = sources["train"].num_classes
    if num_classes == 0:
        raise ConfigError(f"config: data.eval_train: {paths['train']} has no class labels; use an image folder or "
                          "shards written from one (`maws-data shards --folder`)")
    return feats, num_classes


def evaluate(cfg: Config, data: DemoData | None, device: torch.device, echo: Echo) -> list[dict]:
    """Linear probe and k-shot on frozen cls features of every finished encoder of this run."""
    out = Path(cfg.run.out_dir)
    candidates = [(name, label) for name, _, label in wsp_runs(cfg)] + [("mae", "MAE only (no WSP)")]
    e = cfg.eval
    fingerprints = _fingerprints(cfg)
    feats, num_classes = _feature_sets(cfg, data, device)
    rows = []
    for name, label in candidates:
        final = out / name / "final"
        if not final.exists():
            continue
        tensors, meta, _ = load_checkpoint(final)
        check_fingerprint(meta.get("fingerprint", {}), fingerprints[name], final)
        model = build_classifier(cfg.model, num_classes=0).to(device)
        report = load_pretrained(model, tensors, source=str(final))
        if report.initialised:
            raise CheckpointError(f"{final} lacks encoder tensors {report.initialised[:4]}; it cannot be evaluated")

        (f_train, train_y), (f_test, test_y) = feats(model, "train"), feats(model, "test")
        probe = linear_probe(f_train, train_y, f_test, test_y, num_classes=num_classes, epochs=e.probe_epochs,
                             batch_size=e.probe_batch_size, lr=e.probe_lr, seed=cfg.run.seed)
        steps = f"{name.split('_')[0]} {meta['step']}"
        if name == "wsp" and cfg.wsp.init == "mae":
            steps = f"mae {read_meta(out / 'mae' / 'final')['step']} + {steps}"
        row = {"model": label, "stage": name, "train_steps": steps, "linear_probe_top1": probe["top1"],
               "linear_probe_train": probe["num_train"]}
        for k in e.shots:
            fs = fewshot(f_train, train_y, f_test, test_y, num_classes=num_classes, shots=int(k),
                         trials=e.fewshot_trials, seed=cfg.run.seed)
            row[f"{k}shot_top1_mean"], row[f"{k}shot_top1_std"] = fs["top1_mean"], fs["top1_std"]
        echo(f"[linprobe] {label}: linear probe {100 * probe['top1']:.2f}%"
             + "".join(f", {k}-shot {100 * row[f'{k}shot_top1_mean']:.2f}%" for k in e.shots))
        rows.append(row)
    if not rows:
        raise UserError(f"nothing to evaluate under {out}: run the mae and wsp stages first")
    return rows


def results_table(rows: list[dict], shots: list[int]) -> str:
    """A small fixed-width table of the evaluation rows."""
    head = ["model", "training steps", "linear probe top-1"] + [f"{k}-shot top-1 (mean ± std)" for k in shots]
    body = [[r["model"], str(r["train_steps"]), f"{100 * r['linear_probe_top1']:.2f}%"]
            + [f"{100 * r[f'{k}shot_top1_mean']:.2f} ± {100 * r[f'{k}shot_top1_std']:.2f}%" for k in shots] for r in rows]
    widths = [max(len(x) for x in col) for col in zip(head, *body)]
    fmt = lambda cells: "| " + " | ".join(c.ljust(w) for c, w in zip(cells, widths)) + " |"  # noqa: E731
    return "\n".join([fmt(head), "|" + "|".join("-" * (w + 2) for w in widths) + "|"] + [fmt(b) for b in body])


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
    mesh = init_distributed(tp=cfg.parallel.tp, device=device, backend=cfg.parallel.backend)
    try:
        if mesh.distributed and device.type == "cuda":
            device = torch.device("cuda", torch.cuda.current_device())  # this rank's GPU (LOCAL_RANK)
        if mesh.rank != 0:
            echo = lambda _msg: None  # noqa: E731  (one log, from rank 0)
        return _run_stages(cfg, out, device, mesh, echo)
    finally:
        destroy()


def _run_stages(cfg: Config, out: Path, device: torch.device, mesh: Mesh, echo: Echo) -> dict:
    main = mesh.rank == 0
    if main:
        atomic_write_text(out / "config.json", cfg.to_json())
    data = load_data(cfg)
    # Everything that can be checked before hours of training is checked here.
    if "linprobe" in cfg.run.stages and data is None:
        missing = [k for k in ("eval_train", "eval_val") if getattr(cfg.data, k) is None]
        if missing:
            raise ConfigError(f"config: data.{missing[0]}: linprobe on data.dataset=jpeg needs labelled images: set "
                              "--data.eval_train=DIR and --data.eval_val=DIR (image folders, or shards written from "
                              "folders), or run only [mae, wsp]")
        if cfg.data.loader == "reference":
            raise ConfigError("config: data.loader: JPEG evaluation data needs --data.loader=pil or dali")
    if "linprobe" in cfg.run.stages and data is not None:
        check_eval_fits(cfg, data)
    if "wsp" in cfg.run.stages and cfg.wsp.init not in ("mae", "scratch") and not Path(cfg.wsp.init).is_file():
        raise ConfigError(f"config: wsp.init: {cfg.wsp.init} is not a file; use mae, scratch or a model.safetensors path")
    summary: dict = {"stages": {}, "results": []}
    train = dict(parallel=cfg.parallel, mesh=mesh, echo=echo)
    if "mae" in cfg.run.stages:
        summary["stages"]["mae"] = str(run_stage(mae_stage(cfg, data, device, mesh), out, cfg.run, device, **train))
    if "wsp" in cfg.run.stages:
        for name, init, _ in wsp_runs(cfg):
            stage = wsp_stage(cfg, data, device, name, init, mesh)
            summary["stages"][name] = str(run_stage(stage, out, cfg.run, device, **train))
    if "linprobe" in cfg.run.stages and main:  # frozen-feature probes are small: rank 0 runs them alone
        rows = evaluate(cfg, data, device, echo)
        summary["results"] = rows
        atomic_write_text(out / "results.json", json.dumps(rows, indent=2))
        table = results_table(rows, cfg.eval.shots)
        atomic_write_text(out / "results.md", table + "\n")
        echo("\n" + table)
    return summary
