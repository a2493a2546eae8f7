"""Metrics: one JSON object per line (JSONL), appended, so a resumed run continues the file; the
throughput meter; and :class:`StepLog`, what the training loop records per step."""
from __future__ import annotations

import json
import math
import time
from collections.abc import Callable
from pathlib import Path

import torch
from tqdm import tqdm

from maws_fast.errors import UserError
from maws_fast.parallel.mesh import Mesh, all_reduce_mean
from maws_fast.storage import atomic_write_text


class MetricsWriter:
    """Appends dict rows to ``path`` as JSONL; flushes every row so a crash loses nothing logged."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._f = open(self.path, "a", encoding="utf-8")

    def write(self, row: dict) -> None:
        row = {"time": round(time.time(), 3), **row}
        self._f.write(json.dumps(row, sort_keys=True) + "\n")
        self._f.flush()

    def close(self) -> None:
        self._f.close()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def read_metrics(path: str | Path, bad: list[int] | None = None) -> list[dict]:
    """All rows of a JSONL metrics file (empty list if it does not exist). A line that is not a
    JSON object (torn by a crash mid-write or a full disk, or garbled) is skipped; its 1-based line
    number goes to ``bad`` when a list is given."""
    p = Path(path)
    if not p.exists():
        return []
    rows = []
    for i, line in enumerate(p.read_text(encoding="utf-8", errors="replace").splitlines(), 1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except ValueError:
            row = None
        if isinstance(row, dict):
            rows.append(row)
        elif bad is not None:
            bad.append(i)
    return rows


def drop_rows_after(path: str | Path, step: int) -> tuple[int, list[int]]:
    """Remove rows logged after ``step`` (a resumed run re-does those steps) and the lines that are
    not rows (torn, garbled); returns (rows dropped, line numbers of the bad lines).

    The file is rewritten atomically, so a crash here cannot lose the rows that are kept.
    """
    bad: list[int] = []
    rows = read_metrics(path, bad)
    keep = [r for r in rows if isinstance(r.get("step", 0), (int, float)) and r.get("step", 0) <= step]
    if len(keep) < len(rows) or bad:
        atomic_write_text(path, "".join(json.dumps(r, sort_keys=True) + "\n" for r in keep))
    return len(rows) - len(keep), bad


class Throughput:
    """Images/s and achieved FLOP/s between two log points (wall clock)."""

    def __init__(self, flops_per_image: float):
        self.flops_per_image = flops_per_image
        self.t0 = time.perf_counter()
        self.images = 0

    def add(self, n: int) -> None:
        self.images += n

    def read_and_reset(self) -> dict:
        now = time.perf_counter()
        dt = max(now - self.t0, 1e-9)
        ips = self.images / dt
        out = {"images_per_s": round(ips, 2), "tflops": round(ips * self.flops_per_image / 1e12, 6)}
        self.t0, self.images = now, 0
        return out


# Dense peak TFLOP/s per GPU from the vendors' data sheets (no structured sparsity), by the math the
# step's matmuls run in: bf16 tensor cores, TF32 tensor cores, or plain fp32.
PEAK_TFLOPS = {
    "H200": {"bf16": 989.4, "tf32": 494.7, "fp32": 67.0},
    "H100 SXM": {"bf16": 989.4, "tf32": 494.7, "fp32": 67.0},
    "H100 PCIe": {"bf16": 756.5, "tf32": 378.0, "fp32": 51.2},
    "A100": {"bf16": 312.0, "tf32": 156.0, "fp32": 19.5},
}


def peak_tflops(device: torch.device, precision: str, tf32: bool) -> tuple[str, float] | None:
    """``(what, TFLOP/s)`` one device of this kind peaks at for the run's matmul precision, or None
    (a CPU, or a GPU not in :data:`PEAK_TFLOPS`: its rows carry no MFU)."""
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    if "H200" in name:
        gpu = "H200"
    elif "H100" in name:
        gpu = "H100 PCIe" if "PCIe" in name else "H100 SXM"
    elif "A100" in name:
        gpu = "A100"
    else:
        return None
    math_mode = "bf16" if precision == "bf16" else "tf32" if tf32 else "fp32"
    return f"{gpu} {math_mode}", PEAK_TFLOPS[gpu][math_mode]


def diverged(stage: str, what: str, ckpt_dir: Path) -> UserError:
    section = stage.split("_")[0]  # wsp_scratch -> wsp
    return UserError(f"[{stage}] {what}; lower the learning rate (--{section}.blr) or enable --{section}.clip_grad. "
                     f"The last good checkpoint is kept under {ckpt_dir}")


class StepLog:
    """A stage's running loss, throughput, progress bar and metrics.jsonl rows, and its divergence checks.

    The loss is summed on the device every step; the CPU reads it only at log steps, and at
    checkpoint steps to never checkpoint NaN weights (keep=2 would delete the good ones behind).
    Every rank calls :meth:`after_step` (its all-reduce is a collective); rank 0 writes.
    """

    def __init__(self, stage: str, stage_dir: Path, flops_per_image: float, loader, run, mesh: Mesh, total: int,
                 step: int, device: torch.device, echo: Callable[[str], None]):
        main = mesh.rank == 0
        self.stage, self.ckpt_dir, self.loader, self.run, self.mesh = stage, stage_dir / "ckpt", loader, run, mesh
        self.total, self.spe, self.echo = total, loader.num_batches, echo
        self.metrics = MetricsWriter(stage_dir / "metrics.jsonl") if main else None
        self.meter = Throughput(flops_per_image)
        self.bar = tqdm(total=total, initial=step, desc=stage, unit="step", disable=not (run.progress and main),
                        dynamic_ncols=True, mininterval=1.0)  # redrawn at most once a second: piped logs stay short
        self.running = torch.zeros((), device=device)  # loss summed on device: no host sync per step
        self.n = 0
        self.device = device
        self.peak = peak_tflops(device, run.precision, run.tf32)
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)  # the rows' peak memory is this stage's
        if self.peak is not None and main:
            echo(f"[{stage}] MFU against {self.peak[1]:g} TFLOP/s per GPU ({self.peak[0]}, dense) x {mesh.dims.world}")
        self.tb = tensorboard_writer(stage_dir / "tb") if main and getattr(run, "tensorboard", False) else None

    def is_log_step(self, step: int) -> bool:
        """Whether global step ``step`` (counted from 1) writes a metrics row."""
        return step % self.run.log_every == 0 or step == self.total

    def after_step(self, step: int, loss: torch.Tensor, images: int, lr: float, sync: bool = False,
                   grad_norm: torch.Tensor | None = None) -> None:
        """Count global step ``step`` (its mean loss, images over all DP ranks); log at log steps.

        ``sync``: also reduce the loss now and raise if it is not finite (before a checkpoint).
        ``grad_norm``: the step's global gradient norm where the engine computed it (every step of a
        stage that clips, the log steps of one that does not); a log row carries its own step's, read
        with the loss (no extra host sync).
        """
        self.running += loss
        self.n += 1
        self.meter.add(images)
        self.bar.update(1)
        at_log = self.is_log_step(step)
        if at_log or sync:
            all_reduce_mean(self.running, self.mesh)  # the mean over data-parallel ranks; NaN on any rank reaches all
        if at_log:
            self._log(step, lr, grad_norm)
        if sync and self.n and not torch.isfinite(self.running).item():  # the CPU waits here, at checkpoints only
            raise diverged(self.stage, f"loss became non-finite by step {step}", self.ckpt_dir)

    def _log(self, step: int, lr: float, grad_norm: torch.Tensor | None = None) -> None:
        mean_loss = (self.running / self.n).item()  # the CPU waits for the GPU here, at log steps only
        if not math.isfinite(mean_loss):
            raise diverged(self.stage, f"loss is {mean_loss} at step {step}", self.ckpt_dir)
        row = {"stage": self.stage, "step": step, "epoch": round(step / self.spe, 4), "loss": mean_loss, "lr": lr,
               **self.meter.read_and_reset()}
        # MFU: the achieved model FLOP/s of all ranks over their summed peak (None on a CPU). Peak memory:
        # this rank's most allocated since the stage began (None on a CPU: no allocator statistics).
        row["mfu"] = round(row["tflops"] / (self.peak[1] * self.mesh.dims.world), 5) if self.peak else None
        row["peak_mem_bytes"] = torch.cuda.max_memory_allocated(self.device) if self.device.type == "cuda" else None
        # the global norm before clipping (every engine reduces it over DP and TP); None without clipping
        if grad_norm is not None and hasattr(grad_norm, "full_tensor"):  # FSDP2's clip returns a DTensor
            grad_norm = grad_norm.full_tensor()
        row["grad_norm"] = grad_norm.item() if grad_norm is not None else None
        if self.loader.bad is not None:  # corrupt images replaced so far (each was logged by name)
            row["bad_samples"] = len(self.loader.bad.found)
        if self.metrics is not None:
            self.metrics.write(row)
        if self.tb is not None:
            write_scalars(self.tb, row)
        self.bar.set_postfix(loss=f"{mean_loss:.4f}", img_s=f"{row['images_per_s']:.0f}")
        if not self.run.progress:
            self.echo(f"[{self.stage}] step {step}/{self.total} loss {mean_loss:.4f} lr {lr:.2e} "
                      f"{row['images_per_s']:.0f} img/s")
        self.running.zero_()
        self.n = 0

    def close(self) -> None:
        self.bar.close()
        if self.metrics is not None:
            self.metrics.close()
        if self.tb is not None:
            self.tb.close()


def tensorboard_writer(log_dir: Path):
    """A TensorBoard ``SummaryWriter`` on ``log_dir`` (``run.tensorboard``); a UserError naming the
    package when it is not installed (checked before the first step, so no training is lost)."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:  # torch's module imports the tensorboard package
        raise UserError("run.tensorboard=true needs the tensorboard package, which is not installed: "
                        "`pip install tensorboard` (or install maws_fast with the [tensorboard] extra), "
                        "or set --run.tensorboard=false") from e
    return SummaryWriter(log_dir=str(log_dir))


def write_scalars(writer, row: dict) -> None:
    """Mirror one metrics.jsonl row: every number of it, tagged ``<stage>/<key>``, at its step."""
    step = row["step"]
    for key, value in row.items():
        if key in ("step", "stage") or isinstance(value, bool) or not isinstance(value, (int, float)):
            continue
        writer.add_scalar(f"{row['stage']}/{key}", value, global_step=step, walltime=row.get("time"))
    writer.flush()
