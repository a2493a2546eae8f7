"""Input-pipeline throughput: DALI against the PIL / torch DataLoader reference, in one run.

Both loaders read the same webdataset shards of real photographs (scikit-learn's china.jpg and
flower.jpg and scikit-image's JPEG photos, re-encoded at ImageNet-like sizes with varied crops)
and apply the same transform with the same number of CPU threads (DALI threads = DataLoader
workers): ``--transform mae`` is RandomResizedCrop(224, scale (0.2, 1)) + flip + normalise,
``--transform finetune`` the official fine-tune's (scale (0.08, 1), then RandAugment
``rand-m9-mstd0.5-inc1`` and random erasing 0.25: DALI operators against PIL's). On a GPU the DALI
row uses mixed (nvJPEG / hardware) decode; where DALI is not installed there, a torchvision
``decode_jpeg(device="cuda")`` row measures nvJPEG instead. Rows go to benchmarks/results/data.json,
each as soon as its provider is measured; a provider that cannot run here (no DALI, nvJPEG without a
GPU) leaves a skipped row, one that raises a failed row, and the next provider runs.
"""
from __future__ import annotations

import argparse
import io
import os
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

from maws_fast.bench.common import OUT_HELP, default_out, env_info
from maws_fast.bench.results import ResultsFile, failed, is_measured, skipped
from maws_fast.errors import ConfigError


def add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--images", type=int, default=512, help="images in the benchmark shards")
    p.add_argument("--size", type=int, default=224, help="output crop size")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--threads", type=int, default=os.cpu_count() or 2, help="DALI threads = DataLoader workers")
    p.add_argument("--epochs", type=int, default=2, help="timed epochs per provider (after one warm-up batch)")
    p.add_argument("--providers", default="dali,dali_uint8,pil", help="dali, dali_uint8, pil, nvjpeg")
    p.add_argument("--transform", default="mae", choices=("mae", "finetune"),
                   help="mae: crop + flip; finetune: + RandAugment rand-m9-mstd0.5-inc1 + random erasing 0.25")
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shards", default=None, help="existing shard dir to read instead of the generated photos")
    p.add_argument("--out", default=default_out("data.json"), help=OUT_HELP)


def photo_shards(root: Path, n: int, seed: int = 0) -> Path:
    """Writes ``n`` JPEGs (~500x375, quality 90) cut from real photographs into shards."""
    import sklearn
    from PIL import Image

    from maws_fast.data.shards import ShardWriter

    base = Path(sklearn.__file__).parent / "datasets" / "images"
    photos = [Image.open(base / f).convert("RGB") for f in ("china.jpg", "flower.jpg")]
    try:
        import skimage

        photos += [Image.open(Path(skimage.__file__).parent / "data" / f).convert("RGB") for f in ("rocket.jpg", "retina.jpg")]
    except ImportError:
        pass
    rng = np.random.default_rng(seed)
    w = ShardWriter(root, 256)
    for i in range(n):
        im = photos[i % len(photos)]
        cw, ch = int(rng.integers(im.width // 2, im.width + 1)), int(rng.integers(im.height // 2, im.height + 1))
        x, y = int(rng.integers(0, im.width - cw + 1)), int(rng.integers(0, im.height - ch + 1))
        tile = im.crop((x, y, x + cw, y + ch)).resize((500, 375) if cw >= ch else (375, 500), Image.BILINEAR)
        buf = io.BytesIO()
        tile.save(buf, "JPEG", quality=90)
        w.write(f"{i:08d}", buf.getvalue(), {"tags": [i % 10]})
    w.finish()
    return root


def _loader(kind: str, source, args, device: torch.device):
    from maws_fast.data.batching import TrainAugment

    if args.transform == "finetune":
        aug = TrainAugment(args.size, (0.08, 1.0), rand_aug="rand-m9-mstd0.5-inc1", reprob=0.25)
    else:
        aug = TrainAugment(args.size, (0.2, 1.0))
    kw = dict(batch_size=args.batch_size, seed=0, mean=[0.485, 0.456, 0.406], std=[0.229, 0.224, 0.225],
              transform=aug, targets="none", shuffle=True, log=lambda s: None)
    if kind == "pil":
        from maws_fast.data.pil_loader import PilLoader

        return PilLoader(source, num_workers=args.threads, **kw)
    from maws_fast.data.dali import DaliLoader, DaliSettings

    settings = DaliSettings(threads=args.threads, output="uint8" if kind == "dali_uint8" else "float32")
    return DaliLoader(source, device=device, settings=settings, **kw)


def _time_loader(loader, epochs: int, device: torch.device) -> tuple[float, int]:
    """(seconds, images) over ``epochs`` epochs, after one warm-up batch (pipeline build, workers)."""
    it = loader.epoch(0)
    next(it)
    images, t0 = 0, time.perf_counter()
    for x, _ in it:
        images += x.shape[0]
    for e in range(1, epochs):
        for x, _ in loader.epoch(e):
            images += x.shape[0]
    if device.type == "cuda":
        torch.cuda.synchronize(device)  # the last batch's decode must be finished to count
    return time.perf_counter() - t0, images


def _time_nvjpeg(source, args, device: torch.device) -> tuple[float, int]:
    """torchvision nvJPEG decode + crop/resize on the GPU (the DALI-less GPU comparison)."""
    import torch.nn.functional as F
    from torchvision.io import decode_jpeg

    from maws_fast.data.shards import ShardReader

    reader = ShardReader()
    data = [torch.frombuffer(bytearray(reader.read(s)[0]), dtype=torch.uint8) for s in source.shards.samples]
    bs = args.batch_size
    decode_jpeg(data[:bs], device=device)  # warm-up: nvJPEG handles
    torch.cuda.synchronize(device)
    images, t0 = 0, time.perf_counter()
    for _ in range(args.epochs):
        for i in range(0, len(data) - bs + 1, bs):
            imgs = decode_jpeg(data[i : i + bs], device=device)
            out = torch.stack([F.interpolate(im[None].float(), size=(args.size, args.size), mode="bilinear",
                                             antialias=True)[0] for im in imgs])
            images += out.shape[0]
    torch.cuda.synchronize(device)
    return time.perf_counter() - t0, images


def bench_data(args: argparse.Namespace) -> list[dict]:
    from maws_fast.data.sources import open_source

    device = torch.device(args.device)
    if device.type == "cuda" and not torch.cuda.is_available():
        raise ConfigError("maws-bench data: --device cuda but torch sees no CUDA device")
    providers = [p for p in args.providers.split(",") if p]
    unknown = set(providers) - {"dali", "dali_uint8", "pil", "nvjpeg"}
    if unknown:
        raise ConfigError(f"maws-bench data: unknown providers {sorted(unknown)}; use dali, dali_uint8, pil, nvjpeg")
    out = ResultsFile(args.out, "maws-bench data")  # each provider's row is written as soon as it is measured
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(args.shards) if args.shards else photo_shards(Path(tmp) / "shards", args.images)
        source = open_source("webdataset", root)
        env = env_info()
        for p in providers:
            decode = {"pil": "cpu (PIL)", "nvjpeg": "gpu (torchvision nvJPEG)"}.get(
                p, "mixed (nvJPEG)" if device.type == "cuda" else "cpu (DALI)")
            row = {**env, "provider": p, "decode": decode, "transform": args.transform, "size": args.size,
                   "batch_size": args.batch_size, "threads": args.threads, "source_images": len(source)}
            reason = _unavailable(p, device)
            if reason:
                print(f"{p}: skipped, {reason}")
                out.add(skipped(row, reason))
                continue
            try:
                if p == "nvjpeg":
                    secs, n = _time_nvjpeg(source, args, device)
                else:
                    secs, n = _time_loader(_loader(p, source, args, device), args.epochs, device)
                row.update(images=n, seconds=round(secs, 4), images_per_s=round(n / secs, 1))
            except Exception as e:  # this provider's row says why; the next provider runs
                failed(row, e)
                print(f"{p}: FAILED, {row['error']}")
            out.add(row)
            _vs_pil(out)
    for r in out.rows:
        if is_measured(r):
            print(f"{r['provider']:<11} {r['decode']:<26} {r['transform']:<9} {r['images_per_s']:>9.1f} img/s  "
                  f"x{r['vs_pil'] or float('nan'):.2f} vs PIL  ({r['images']} images, {r['threads']} threads)")
    return out.rows


def _unavailable(provider: str, device: torch.device) -> str | None:
    """Why ``provider`` cannot run here (a skipped row), or None."""
    if provider.startswith("dali"):
        from maws_fast.data.dali import dali_unavailable

        return dali_unavailable() or None
    if provider == "nvjpeg":
        if device.type != "cuda":
            return "needs --device cuda"
        try:
            import torchvision.io  # noqa: F401
        except Exception as e:  # not installed, or built for another torch
            return f"torchvision is not usable here ({type(e).__name__}: {e})"
    return None


def _vs_pil(out: ResultsFile) -> None:
    """Every measured row's speed against the PIL reference's (None until PIL has run), saved."""
    rows = [r for r in out.rows if is_measured(r)]
    base = next((r["images_per_s"] for r in rows if r["provider"] == "pil"), None)
    for r in rows:
        r["vs_pil"] = round(r["images_per_s"] / base, 2) if base else None
    out.save()
