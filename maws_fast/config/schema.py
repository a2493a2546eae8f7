"""The config tree: the root :class:`Config` and its run, data (with its ``dali`` section), model,
eval and parallel sections (the stages' sections are in :mod:`maws_fast.config.stages`), and the
walk over the tree that help, errors and the CLI take their section names from."""
from __future__ import annotations

import dataclasses
import json
import re
import typing
from collections.abc import Iterator
from dataclasses import dataclass

from maws_fast.config.fields import (
    ATTN_BACKENDS, CHECKPOINT_MODES, DALI_OUTPUTS, DEFAULT_STAGES, FORMATS, LOADERS, PARALLEL_ENGINES, STAGES, check,
    setting,
)
from maws_fast.config.stages import FinetuneConfig, LiTConfig, MAEConfig, WSPConfig


# --- model -----------------------------------------------------------------------------------
@dataclass
class ModelConfig:
    preset: str = setting("tiny", "name the other fields were filled from (informational once resolved)")
    img_size: int = setting(28, "input side in pixels")
    patch_size: int = setting(4, "patch side p")
    in_chans: int = setting(1, "image channels")
    embed_dim: int = setting(128, "encoder width D")
    depth: int = setting(4, "encoder blocks")
    num_heads: int = setting(4, "encoder heads")
    mlp_ratio: float = setting(4.0, "MLP hidden = mlp_ratio * width (encoder and decoder)")
    decoder_embed_dim: int = setting(64, "MAE decoder width")
    decoder_depth: int = setting(2, "MAE decoder blocks")
    decoder_num_heads: int = setting(4, "MAE decoder heads")
    attn_backend: str = setting("sdpa", "attention backend: triton | sdpa | xformers (GPU) | manual")
    kernel_backend: str | None = setting(
        None, "maws_kernels backend: triton | cuda (csrc twins of patch gather + loss) | torch | null (best available)")

    def __post_init__(self):
        for k in ("img_size", "patch_size", "in_chans", "embed_dim", "depth", "num_heads",
                  "decoder_embed_dim", "decoder_depth", "decoder_num_heads"):
            check(int(getattr(self, k)) >= 1, f"model.{k}", "must be >= 1")
        check(self.img_size % self.patch_size == 0, "model.img_size",
              f"{self.img_size} is not divisible by model.patch_size={self.patch_size}")
        check(self.embed_dim % self.num_heads == 0, "model.embed_dim",
              f"{self.embed_dim} is not divisible by model.num_heads={self.num_heads}")
        check(self.decoder_embed_dim % self.decoder_num_heads == 0, "model.decoder_embed_dim",
              f"{self.decoder_embed_dim} is not divisible by model.decoder_num_heads={self.decoder_num_heads}")
        check(self.embed_dim % 4 == 0 and self.decoder_embed_dim % 4 == 0, "model.embed_dim",
              "widths must be divisible by 4 for the 2D sin-cos position embedding")
        check(self.mlp_ratio > 0, "model.mlp_ratio", "must be > 0")
        check(self.attn_backend in ATTN_BACKENDS, "model.attn_backend",
              f"{self.attn_backend!r} is not one of {ATTN_BACKENDS}")
        if self.kernel_backend is not None:
            # maws_kernels owns its backend names; imported only when one is named (it imports torch)
            from maws_kernels import BACKENDS

            check(self.kernel_backend in BACKENDS, "model.kernel_backend",
                  f"{self.kernel_backend!r} is not one of {', '.join(BACKENDS)} or null")

    @property
    def num_patches(self) -> int:
        return (self.img_size // self.patch_size) ** 2


# --- eval ------------------------------------------------------------------------------------
@dataclass
class EvalConfig:
    train_subset: int = setting(
        10000, "Fashion-MNIST train images whose frozen features fit the probe (0 = all; JPEG eval uses all)")
    probe_epochs: int = setting(30, "linear-probe epochs over the cached features")
    probe_lr: float = setting(0.1, "linear-probe base lr")
    probe_batch_size: int = setting(256, "linear-probe batch size")
    probe_optimizer: str = setting("sgd", "linear-probe optimizer: sgd (momentum 0.9) | lars (the official MAE probe's: "
                                   "momentum 0.9, trust 0.001, no rescale or decay of 1-D params)")
    probe_warmup_epochs: float = setting(0.0, "linear-probe lr warmup before the cosine (official: 10 of 90)")
    init: str | None = setting(None, "probe this checkpoint instead of the run's encoders: a checkpoint directory, "
                               ".safetensors or .pth/.pt/.bin (official MAE, MAWS, timm); null = this run's")
    clip: str | None = setting(None, "evaluate this MAWS CLIP checkpoint (vit_*_xlmr_*.pt: ViT + XLM-R) instead of the "
                               "run's encoders: zero-shot on data.eval_val's classes, and the probes of its image "
                               "tower; needs the [xlmr] extra")
    clip_tokenizer: str = setting("xlm-roberta-base", "eval.clip's XLM-R tokenizer: a local HF tokenizer directory, or a "
                                  "hub name (downloaded once by transformers)")
    shots: list[int] = setting(lambda: [5], "k for k-shot evaluation")
    fewshot_trials: int = setting(5, "random support sets per k")
    batch_size: int = setting(512, "feature-extraction batch size")

    def __post_init__(self):
        check(self.train_subset >= 0, "eval.train_subset", "must be >= 0")
        check(self.probe_epochs >= 1 and self.probe_lr > 0, "eval.probe_epochs", "epochs >= 1 and lr > 0")
        check(all(int(k) >= 1 for k in self.shots), "eval.shots", "every k must be >= 1")
        check(self.fewshot_trials >= 1, "eval.fewshot_trials", "must be >= 1")
        check(self.batch_size >= 1, "eval.batch_size", "must be >= 1")
        check(self.probe_batch_size >= 2, "eval.probe_batch_size", "must be >= 2 (the probe's BatchNorm needs 2)")
        check(self.probe_optimizer in ("sgd", "lars"), "eval.probe_optimizer", f"{self.probe_optimizer!r}: use sgd or lars")
        check(0 <= self.probe_warmup_epochs < self.probe_epochs, "eval.probe_warmup_epochs",
              f"must be in [0, probe_epochs={self.probe_epochs})")
        check(self.clip is None or self.init is None, "eval.clip", "set eval.clip or eval.init, not both")


# --- data ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class DaliSettings:
    """Tuning knobs of the DALI pipelines (``data.dali``; :class:`maws_fast.data.dali.DaliLoader` takes it as is)."""

    threads: int = setting(4, "DALI CPU threads per pipeline (reader, and host-side decode work)")
    hw_decoder_load: float = setting(
        0.65, "share of JPEGs decoded by the GPU's hardware JPEG decoder (mixed decode)")
    device_memory_padding: int = setting(16 << 20, "nvJPEG device buffer over-allocation (bytes; mixed decode)")
    host_memory_padding: int = setting(8 << 20, "nvJPEG pinned host buffer over-allocation (bytes; mixed decode)")
    preallocate_width_hint: int = setting(0, "nvJPEG preallocation: expected max width (0 = none)")
    preallocate_height_hint: int = setting(0, "nvJPEG preallocation: expected max height (0 = none)")
    prefetch: int = setting(2, "reader batches read ahead")
    shuffle_buffer: int = setting(4096, "DALI reader shuffle buffer, samples (shards are shuffled when written)")
    output: str = setting("float32", "float32 (normalised by DALI) | uint8 (normalised on the device after the copy: "
                          "a quarter of the bytes through it)")

    def __post_init__(self):
        # full keys: the loaders and benchmarks build this section on its own, outside a Config
        for k in ("threads", "prefetch", "shuffle_buffer"):
            check(getattr(self, k) >= 1, f"data.dali.{k}", "must be >= 1")
        check(0 <= self.hw_decoder_load <= 1, "data.dali.hw_decoder_load", "must be in [0, 1]")
        check(self.output in DALI_OUTPUTS, "data.dali.output", f"{self.output!r}: use {' or '.join(DALI_OUTPUTS)}")


@dataclass
class DataConfig:
    dataset: str = setting(
        "fmnist", "fmnist (the demo: eval data, and training data for loader=reference) | jpeg (data.train)")
    root: str | None = setting(None, "Fashion-MNIST directory; null = /usr/share/datasets/fashion-mnist")
    loader: str = setting(
        "reference", "reference (in-memory Fashion-MNIST) | pil (PIL/DataLoader JPEG) | dali (NVIDIA DALI)")
    format: str = setting("webdataset", "JPEG source of the pil / dali loaders: webdataset | folder | filelist")
    train: str | None = setting(
        None, "MAE (and WSP) training data for pil / dali: shard dir, image folder or file list")
    wsp_train: str | None = setting(None, "WSP training data if not data.train (e.g. hashtag shards)")
    eval_train: str | None = setting(
        None, "dataset=jpeg: labelled images the linear probe / k-shot fit on (folder or shards)")
    eval_val: str | None = setting(None, "dataset=jpeg: labelled images they are scored on")
    eval_crop_frac: float = setting(
        0.875, "eval transform: resize the shorter side to img_size / crop_frac, centre crop")
    tags: str | None = setting(None, "hashtag JSONL of a file list ({\"file\": ..., \"tags\": [...]})")
    captions: str | None = setting(None, "caption JSONL of a file list ({\"file\": ..., \"caption\": \"...\"}; LiT)")
    lit_train: str | None = setting(None, "LiT training data if not data.train: captioned shards, or a file list with "
                                    "data.captions")
    vocab: str | None = setting(None, "hashtag vocabulary (vocab.json); shards name theirs in their manifest")
    num_workers: int = setting(0, "DataLoader worker processes (reference / pil; 0 = load in the training process)")
    max_bad_samples: int = setting(100, "distinct corrupt images tolerated (each logged by name) before the run stops")
    max_tags: int = setting(0, "pad width of WSP tag ids (0 = the longest list in the batch)")
    dali: DaliSettings = setting(DaliSettings, "the NVIDIA DALI pipelines' settings (data.loader=dali)")
    mean: list[float] = setting(lambda: [0.2860], "per-channel mean of [0,1] pixels")
    std: list[float] = setting(lambda: [0.3530], "per-channel std of [0,1] pixels")

    def __post_init__(self):
        check(self.dataset in ("fmnist", "jpeg"), "data.dataset", f"{self.dataset!r}: use fmnist or jpeg")
        check(self.loader in LOADERS, "data.loader", f"{self.loader!r}: choose from {LOADERS}")
        check(self.format in FORMATS, "data.format", f"{self.format!r}: choose from {FORMATS}")
        check(self.loader == "reference" or self.train is not None, "data.train",
              f"data.loader={self.loader} reads JPEGs: set --data.train=PATH (shards from `maws-data shards`, "
              "an image folder or a file list)")
        check(self.loader != "reference" or self.dataset == "fmnist", "data.loader",
              "the reference loader holds Fashion-MNIST in memory; JPEG data needs --data.loader=pil or dali")
        check(self.num_workers >= 0, "data.num_workers", "must be >= 0")
        check(self.max_bad_samples >= 0 and self.max_tags >= 0, "data.max_bad_samples", "must be >= 0")
        check(0 < self.eval_crop_frac <= 1, "data.eval_crop_frac", "must be in (0, 1]")
        check(len(self.mean) == len(self.std) and all(s > 0 for s in self.std), "data.std",
              "mean and std need one value per channel and std > 0")


# --- parallel and run ------------------------------------------------------------------------
def check_layout(engine: str, zero_stage: int | None, tp: int, param_dtype: str, bucket_mb: float) -> None:
    """The parallel layout's rules, in the words of its config keys: run as a config is read
    (automatic values allowed) and again by ``maws_fast.parallel.mesh.ParallelLayout`` on the resolved
    values a stage runs with, so a mistake reads the same wherever it is caught."""
    check(engine in PARALLEL_ENGINES, "parallel.engine", f"{engine!r}: choose from {PARALLEL_ENGINES}")
    check(zero_stage in (None, 0, 1, 2, 3), "parallel.zero_stage", f"{zero_stage}: use 0, 1, 2, 3 or null (auto)")
    check(engine == "ours" or tp == 1, "parallel.tp",
          f"tensor parallel runs with engine=ours; engine={engine} is data parallel only (set --parallel.tp=1)")
    check(bucket_mb > 0, "parallel.bucket_mb", "must be > 0")
    check(param_dtype in ("auto", "fp32", "bf16"), "parallel.param_dtype", f"{param_dtype!r}: use auto, fp32 or bf16")
    check(engine != "ddp" or param_dtype in ("auto", "fp32"), "parallel.param_dtype",
          "ddp keeps fp32 weights; use engine=ours or fsdp2 for a bf16 model copy (or run.precision=bf16)")


@dataclass
class ParallelConfig:
    engine: str = setting("ours", "ours (ZeRO + TP on our collectives) | fsdp2 (torch fully_shard) | ddp (torch DDP)")
    zero_stage: int | None = setting(
        None, "engine=ours: 0 replicate all | 1 shard optimizer | 2 + gradients | 3 + parameters | "
        "null = auto: 0 when the data-parallel world is 1 (nothing to shard), else 2")
    tp: int = setting(1, "tensor-parallel degree (engine=ours); the data-parallel degree is world / tp")
    bucket_mb: float = setting(25.0, "gradient bucket size in MiB (ours stages 0-2, ddp)")
    prefetch: bool = setting(True, "stage 3: all-gather the next block while the current one runs")
    param_dtype: str = setting(
        "auto", "model weights: fp32 | bf16 (bf16 copy, fp32 master + AdamW state; ours / fsdp2) | "
        "auto = bf16 when run.precision resolves to bf16 and the engine is ours or fsdp2, else fp32")
    grad_accum: int = setting(1, "micro-batches per optimizer step (no communication until the last)")
    backend: str = setting("auto", "process-group backend: auto (nccl on cuda, else gloo) | gloo | nccl")
    timeout_s: float = setting(1800.0, "seconds a collective may wait for a missing rank before it fails")
    stall_timeout_s: float = setting(
        300.0, "the heartbeat watchdog ends the job, naming the rank, when a rank's process has not beaten for this "
        "many seconds (SIGSTOP, a frozen host); 0 = off. Under torchrun only")

    def __post_init__(self):
        check(self.tp >= 1, "parallel.tp", "must be >= 1")
        check_layout(self.engine, self.zero_stage, self.tp, self.param_dtype, self.bucket_mb)
        check(self.grad_accum >= 1, "parallel.grad_accum", "must be >= 1")
        check(self.timeout_s > 0, "parallel.timeout_s", "must be > 0 seconds")
        check(self.stall_timeout_s >= 0, "parallel.stall_timeout_s", "must be >= 0 seconds (0 = off)")
        check(self.backend in ("auto", "gloo", "nccl"), "parallel.backend", f"{self.backend!r}: use auto, gloo or nccl")


@dataclass
class RunConfig:
    out_dir: str = setting("runs/demo", "where checkpoints, metrics and results go")
    seed: int = setting(0, "seeds every RNG (data order, augmentation, masking, init)")
    device: str = setting("cpu", "cpu | cuda | cuda:N")
    threads: int = setting(0, "torch intra-op threads (0 = torch's default)")
    stages: list[str] = setting(lambda: list(DEFAULT_STAGES), "stages to run, in order (lit is opt-in)")
    ckpt_every: int = setting(200, "steps between checkpoints (the end of a stage always writes one)")
    log_every: int = setting(20, "steps between metric lines (the CPU waits for the loss only here)")
    progress: bool = setting(True, "tqdm progress bar")
    precision: str = setting(
        "auto", "compute dtype: fp32 | bf16 (bf16 activations; weights per parallel.param_dtype, fp32 master and "
        "AdamW state) | auto = bf16 on cuda, fp32 on cpu")
    tf32: bool = setting(True, "cuda: TF32 tensor cores for whatever matmuls and convolutions stay fp32")
    compile: bool = setting(
        False, "regional torch.compile: each transformer block's body compiled on its own (fullgraph), the engines' "
        "hooks left eager around it; dynamo's caches scoped to each stage (its graph count printed at its end); "
        "the first steps pay the compile; MAWS_COMPILE_BACKEND names another dynamo backend (default inductor)")
    activation_checkpoint: str = setting(
        "none", "per block: none | full (keep only the block's input, recompute its forward in backward) | "
        "selective (also keep the qkv and fc1 GEMM outputs; recompute norms, attention, GELU, the attention "
        "projection)")
    tensorboard: bool = setting(False, "also write every metrics row to TensorBoard under <out_dir>/<stage>/tb "
                                "(needs the tensorboard package)")

    def __post_init__(self):
        check(len(self.stages) > 0, "run.stages", f"is empty; choose from {STAGES}")
        bad = [s for s in self.stages if s not in STAGES]
        check(not bad, "run.stages", f"unknown stage(s) {bad}; choose from {STAGES}")
        check(self.ckpt_every >= 1 and self.log_every >= 1, "run.ckpt_every", "intervals must be >= 1")
        check(re.fullmatch(r"cpu|cuda(:\d+)?", self.device) is not None, "run.device", f"{self.device!r}: use cpu or cuda[:N]")
        check(self.threads >= 0, "run.threads", "must be >= 0 (0 = torch's default)")
        check(self.precision in ("auto", "fp32", "bf16"), "run.precision", f"{self.precision!r}: use auto, fp32 or bf16")
        check(self.activation_checkpoint in CHECKPOINT_MODES, "run.activation_checkpoint",
              f"{self.activation_checkpoint!r}: use one of {CHECKPOINT_MODES}")


# --- the root --------------------------------------------------------------------------------
@dataclass
class Config:
    run: RunConfig = setting(RunConfig, "where and what to run")
    data: DataConfig = setting(DataConfig, "dataset and loader")
    model: ModelConfig = setting(ModelConfig, "architecture (model.preset fills the other fields first; defaults: tiny)")
    mae: MAEConfig = setting(MAEConfig, "MAE pre-pretraining")
    wsp: WSPConfig = setting(WSPConfig, "weakly supervised pretraining")
    finetune: FinetuneConfig = setting(FinetuneConfig, "fine-tuning on labelled data (the official MAE recipe)")
    lit: LiTConfig = setting(LiTConfig, "locked-image text tower (LiT) for zero-shot transfer")
    eval: EvalConfig = setting(EvalConfig, "linear probe and few-shot")
    parallel: ParallelConfig = setting(ParallelConfig, "engine, ZeRO stage, tensor parallel")

    def __post_init__(self):
        check(len(self.data.mean) == self.model.in_chans, "data.mean",
              f"has {len(self.data.mean)} values but model.in_chans is {self.model.in_chans}")
        par = self.parallel
        shards_params = (par.engine == "ours" and par.zero_stage == 3) or par.engine == "fsdp2"
        check(not (self.run.precision == "bf16" and shards_params and par.param_dtype == "fp32"), "parallel.param_dtype",
              "run.precision=bf16 with sharded parameters (zero_stage=3 or fsdp2) and fp32 weights: autocast keeps a "
              "bf16 copy of every weight from forward to backward, undoing the sharding; set --parallel.param_dtype=bf16")
        tp, m = self.parallel.tp, self.model
        hidden = int(m.embed_dim * m.mlp_ratio), int(m.decoder_embed_dim * m.mlp_ratio)
        check(all(n % tp == 0 for n in (m.num_heads, m.decoder_num_heads, *hidden)), "parallel.tp",
              f"{tp} must divide the encoder and decoder head counts ({m.num_heads}, {m.decoder_num_heads}) and MLP "
              f"widths {hidden}; choose a divisor of them")
        L = self.model.num_patches
        check(int(L * (1 - self.mae.mask_ratio)) >= 1, "mae.mask_ratio",
              f"{self.mae.mask_ratio} keeps no patch of {L}; lower it")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2, sort_keys=True)


def subsections(cls: type, prefix: str = "") -> Iterator[tuple[str, dataclasses.Field, type]]:
    """Every section under ``cls``, depth first, as (dotted name, its field, its class):
    ``("run", ...)``, ``("data", ...)``, ``("data.dali", ...)``, ..., ``("mae.augment", ...)``."""
    hints = typing.get_type_hints(cls)
    for f in dataclasses.fields(cls):
        if dataclasses.is_dataclass(hints[f.name]):
            yield f"{prefix}{f.name}", f, hints[f.name]
            yield from subsections(hints[f.name], f"{prefix}{f.name}.")


def section_names(nested: bool = False) -> tuple[str, ...]:
    """The config's sections as the dataclass tree has them: the top level (run, data, model, ...), or
    with ``nested`` every one (data.dali, mae.augment, ...)."""
    return tuple(name for name, _, _ in subsections(Config) if nested or "." not in name)
