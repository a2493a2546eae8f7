"""The LiT stage: a text tower trained against a locked image encoder, for zero-shot transfer.

What it trains on: the demo's weak-hashtag mosaics (the WSP data) with one caption each, written
from the sample's noisy tags (:func:`maws_fast.data.fmnist.make_captions`), the first
``lit.num_samples`` of them; or, with a JPEG loader (pil / dali), captioned JPEGs
(``data.lit_train`` or ``data.train``: shards whose samples carry a ``caption``, or a file list
with a caption JSONL, ``data.captions``). The image tower (``lit.init``: this run's mae / wsp /
wsp_scratch, or a checkpoint) is locked. The demo's data is not augmented, so the tower's pooled
features are computed once, under no_grad, and the stage trains only the text tower, the two
projections and the temperature on that feature cache; JPEG batches are augmented
(``lit.augment``: ``crop_scale``, ``flip_p``) and run through the locked tower under no_grad each step.
The tokenizer, a BPE trained on the captions (or ``lit.tokenizer``), is written to
``<out_dir>/<stage>/tokenizer.json`` next to the stage's checkpoints; its hash is part of the
stage's fingerprint, so a checkpoint is never resumed or evaluated with another tokenizer.

Under data parallelism (ours, any ZeRO stage, or DDP; not FSDP2) every rank computes the whole feature cache
and its share of each batch; the loss all-gathers both embeddings with their gradient. Gradient
accumulation splits the contrastive batch: each micro-batch's captions see only that
micro-batch's images as negatives. Tensor parallelism is not supported for this stage.
"""
from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from maws_fast.config import Config
from maws_fast.data import fmnist
from maws_fast.data.demo import DemoData
from maws_fast.data.loader import check_batch, eval_format, jpeg_loader
from maws_fast.data.pil_loader import check_captions
from maws_fast.data.reference import BatchLoader, PairLoader
from maws_fast.data.shards import MANIFEST
from maws_fast.data.sources import open_source
from maws_fast.data.text import CaptionTokenizer, TokenizedLoader, source_captions
from maws_fast.errors import CheckpointError, ConfigError
from maws_fast.eval.features import extract_features
from maws_fast.eval.zeroshot import DEFAULT_TEMPLATES, class_embeddings, zero_shot_accuracy
from maws_fast.models import build_classifier, load_encoder, op_backend, unwrap_state_dict
from maws_fast.models.flops import flops_per_image
from maws_fast.models.lit import LiT
from maws_fast.models.text import TextTransformer
from maws_fast.parallel.mesh import Mesh
from maws_fast.seeds import Stream, mix_seed
from maws_fast.storage import list_checkpoints, load_checkpoint, read_weights
from maws_fast.train.checkpoint import check_fingerprint
from maws_fast.train.loop import Stage, say
from maws_fast.train.objectives import LiTObjective
from maws_fast.train.runs import data_shard, fingerprints, init_path

TOKENIZER_FILE = "tokenizer.json"


def check_lit_config(cfg: Config, data: DemoData | None) -> None:
    """Before any training: what the lit stage cannot run with."""
    d = cfg.data
    if d.loader == "reference" and data is None:
        raise ConfigError("config: run.stages: the lit stage on data.loader=reference trains on the Fashion-MNIST "
                          "demo's captioned mosaics (data.dataset=fmnist); for JPEGs use --data.loader=pil or dali")
    if d.loader != "reference" and d.format == "folder":
        raise ConfigError("config: data.format: an image folder has no captions; LiT reads captioned shards or a file "
                          "list with --data.captions (set --data.format=webdataset or filelist)")
    if d.loader != "reference" and d.format == "filelist" and d.captions is None:
        raise ConfigError("config: data.captions: LiT on a file list needs its caption JSONL ({\"file\": ..., "
                          "\"caption\": \"...\"} per image): set --data.captions=FILE")
    if d.loader != "reference" and d.format == "webdataset":
        _check_shard_captions(d.lit_train or d.train)
    if cfg.parallel.tp != 1:
        raise ConfigError(f"config: parallel.tp: the lit stage is data parallel only; run it with --parallel.tp=1 "
                          f"(got {cfg.parallel.tp})")
    if cfg.parallel.engine == "fsdp2":
        raise ConfigError("config: parallel.engine: fsdp2 would shard the locked image tower, which the lit stage runs "
                          "outside the sharded forward (its feature cache); use --parallel.engine=ours or ddp")


def _check_shard_captions(path: str | None) -> None:
    """Before any stage trains: shards the lit stage would read say in their manifest how many captions
    they hold; too few is the error the stage itself would raise, hours later. (Without a manifest, or
    with no path yet, the stage's own check runs when it starts.)"""
    if not path:
        return
    manifest = Path(path) / MANIFEST
    try:
        m = json.loads(manifest.read_text())
        n, total = int(m.get("captions", 0)), int(m["num_samples"])
    except (OSError, ValueError, KeyError, TypeError):
        return
    if n != total:
        raise ConfigError(f"config: data.lit_train: the lit stage reads {path}, whose shards hold {n} captions for {total} "
                          "samples; point --data.lit_train at captioned shards (`maws-data shards --list L --captions "
                          "C.jsonl`, or --fmnist --weak-hashtags N) or leave lit out of --run.stages")


def demo_captions(cfg: Config, data: DemoData) -> tuple[torch.Tensor, list[str]]:
    """The LiT pairs of the demo: the first ``lit.num_samples`` WSP mosaics and their captions."""
    n = len(data.wsp_x) if cfg.lit.num_samples == 0 else min(cfg.lit.num_samples, len(data.wsp_x))
    return data.wsp_x[:n], fmnist.make_captions(data.wsp_tags[:n], mix_seed(cfg.run.seed, Stream.CAPTIONS))


def tokenizer_for(cfg: Config, captions) -> CaptionTokenizer:
    """``lit.tokenizer``, or a BPE trained on ``captions`` (a list, or a function returning one: called
    only when there is a BPE to train). Deterministic: every rank trains the same one."""
    lc = cfg.lit
    tok = CaptionTokenizer.load(lc.tokenizer) if lc.tokenizer else CaptionTokenizer.train(
        captions() if callable(captions) else captions, lc.vocab_size, lc.context_length)
    if tok.context_length != lc.context_length:
        raise ConfigError(f"config: lit.tokenizer: {lc.tokenizer} pads to {tok.context_length} tokens but "
                          f"lit.context_length is {lc.context_length}; set them equal")
    return tok


def tokenizer_sha256(text: str) -> str:
    return hashlib.sha256(text.encode()).hexdigest()


def build_lit(cfg: Config, vocab_size: int, pad_id: int = 0) -> LiT:
    """The LiT model of ``cfg``: its ViT (pooled, no head) locked, a new text tower and projections."""
    lc, m = cfg.lit, cfg.model
    tower = build_classifier(m, num_classes=0)
    text = TextTransformer(vocab_size, lc.context_length, lc.width, lc.depth, lc.num_heads, lc.mlp_ratio, pad_id=pad_id,
                           attn_backend=m.attn_backend, kernel_backend=m.kernel_backend)
    return LiT(tower, text, m.embed_dim, lc.width, lc.embed_dim, lc.init_logit_scale).lock_vision()


def lit_flops_per_pair(cfg: Config, mean_tokens: float) -> float:
    """Analytic training FLOPs per pair with a feature cache (a prediction, counted, not measured):
    the text tower's GEMMs and attention forward + backward, and both projections."""
    lc = cfg.lit
    w, n, hidden = lc.width, mean_tokens, int(lc.width * lc.mlp_ratio)
    per_block = 2 * n * (4 * w * w + 2 * w * hidden) + 4 * n * n * w  # forward: GEMMs + QK^T and PV
    return 3 * (lc.depth * per_block + 2 * w * lc.embed_dim + 2 * cfg.model.embed_dim * lc.embed_dim)


def lit_stage(cfg: Config, data: DemoData, device: torch.device, name: str, init: str, out_dir: Path,
              mesh: Mesh | None = None, write: bool = True) -> Stage:
    """The LiT stage ``name`` on image tower ``init``; rank 0 (``write``) writes the tokenizer."""
    check_lit_config(cfg, data)
    lc = cfg.lit
    rank, dp = data_shard(mesh)
    check_batch(lc.batch_size, dp, cfg.parallel.grad_accum)
    if cfg.data.loader != "reference":
        return _jpeg_lit_stage(cfg, device, name, init, out_dir, mesh, write)
    images, captions = demo_captions(cfg, data)
    tok = stage_tokenizer(cfg, Path(out_dir) / name, captions, write)
    text = tok.to_str()
    ids = tok.encode(captions)
    model, init_fn = _model_and_init(cfg, tok, device, init)

    def features() -> torch.Tensor:  # the feature cache: every image through the locked tower once
        batches = BatchLoader(images, None, cfg.eval.batch_size, cfg.run.seed, cfg.data.mean, cfg.data.std,
                              drop_last=False, shuffle=False)
        tower = model.vision_encoder
        # in the tower's dtype: a bf16 engine has cast the frozen tower (the objective's input hook, which casts
        # images, is not on this path). Zero-shot evaluation later runs the tower in fp32 (load_lit).
        dtype = next(tower.parameters()).dtype
        return extract_features(tower, ((x.to(dtype), y) for x, y in batches.epoch(0)), device=device).to(device)

    loader = PairLoader(features, ids, lc.batch_size, cfg.run.seed, shard=(rank, dp))
    mean_tokens = float((ids != tok.pad_id).sum(1).float().mean())
    fp = {**fingerprints(cfg)[name], "tokenizer_sha256": tokenizer_sha256(text)}
    objective = LiTObjective(model, mesh, op_backend(cfg.model.kernel_backend, False))
    return Stage(name, objective, loader, lc, lit_flops_per_pair(cfg, mean_tokens), fp, init_fn)


def stage_tokenizer(cfg: Config, stage_dir: Path, captions, write: bool) -> CaptionTokenizer:
    """The tokenizer of LiT stage ``stage_dir``: the one its checkpoints were trained with when it has
    any (never overwritten: another one is refused), else the config's (``lit.tokenizer`` or a BPE
    trained on ``captions``), written beside the checkpoints by rank 0 (``write``)."""
    path = stage_dir / TOKENIZER_FILE
    finished = (stage_dir / "final").exists()
    if (finished or list_checkpoints(stage_dir / "ckpt")) and path.is_file():
        saved = CaptionTokenizer.load(path)
        if finished and cfg.lit.tokenizer is None:
            return saved  # not retrained for a stage that is done (its config is checked against final/)
        want = tokenizer_for(cfg, captions)
        if want.to_str() != saved.to_str():
            source = f"lit.tokenizer={cfg.lit.tokenizer}" if cfg.lit.tokenizer else "a BPE of the captions, which changed"
            raise CheckpointError(f"{path}, the tokenizer {stage_dir}'s checkpoints were trained with, differs from the one "
                                  f"this config gives ({source}); it is kept as it is: use a new --run.out_dir, or delete "
                                  f"{stage_dir} to start that stage over")
        return saved
    tok = tokenizer_for(cfg, captions)
    if write and (not path.exists() or path.read_text() != tok.to_str()):
        path.parent.mkdir(parents=True, exist_ok=True)
        tok.save(path)
    return tok


def _jpeg_lit_stage(cfg: Config, device: torch.device, name: str, init: str, out_dir: Path, mesh: Mesh | None,
                    write: bool) -> Stage:
    """LiT on captioned JPEGs: augmented batches through the locked tower each step (no cache)."""
    d, lc = cfg.data, cfg.lit
    rank, dp = data_shard(mesh)
    path = d.lit_train or d.train
    source = open_source(d.format, path, d.tags, d.vocab, d.captions)
    check_captions(source)
    tok = stage_tokenizer(cfg, Path(out_dir) / name, lambda: source_captions(source), write)
    loader = TokenizedLoader(jpeg_loader(cfg, source, lc.batch_size, lc.augment.crop_scale, lc.augment.flip_p, "caption",
                                         device, shard=(rank, dp), log=say), tok)
    model, init_fn = _model_and_init(cfg, tok, device, init)
    fp = {**fingerprints(cfg)[name], "tokenizer_sha256": tokenizer_sha256(tok.to_str())}
    objective = LiTObjective(model, mesh, op_backend(cfg.model.kernel_backend, False))
    tower = flops_per_image(cfg.model, "eval")  # the locked tower's forward, every step
    return Stage(name, objective, loader, lc, tower + lit_flops_per_pair(cfg, lc.context_length / 2), fp, init_fn)


def _model_and_init(cfg: Config, tok: CaptionTokenizer, device: torch.device, init: str):
    torch.manual_seed(mix_seed(cfg.run.seed, Stream.LIT_INIT))
    model = build_lit(cfg, tok.vocab_size, tok.pad_id).to(device)

    def init_fn() -> str:
        path = init_path(cfg, init)
        if not path.exists():
            raise CheckpointError(f"lit.init={init!r} needs {path}, which does not exist; run that stage first or "
                                  "point --lit.init at a checkpoint of model's architecture")
        sd = {k: v for k, v in unwrap_state_dict(read_weights(path)).items() if not k.startswith("head.")}
        report = load_encoder(model.vision_encoder, sd, str(path),
                              hint="--lit.init must point at an MAE, WSP or ViT checkpoint of this model config")
        return f"image tower locked, from {path}: {report.summary()}"

    return model, init_fn


def load_lit(cfg: Config, name: str, device: torch.device) -> tuple[LiT, CaptionTokenizer, dict]:
    """This run's finished LiT stage ``name``: the model (eval mode), its tokenizer and the meta.

    Raises:
        CheckpointError: no final checkpoint or tokenizer, another config or tokenizer than this
            run's, or tensors that do not fit the model.
    """
    stage_dir = Path(cfg.run.out_dir) / name
    final, tok_path = stage_dir / "final", stage_dir / TOKENIZER_FILE
    if not tok_path.is_file():
        raise CheckpointError(f"{tok_path} is missing: the LiT checkpoint {final} cannot be read without the tokenizer "
                              f"it was trained with; delete {stage_dir} and rerun the lit stage")
    tensors, meta = load_checkpoint(final)
    text = tok_path.read_text()
    check_fingerprint(meta.get("fingerprint", {}), {**fingerprints(cfg)[name], "tokenizer_sha256": tokenizer_sha256(text)},
                      final)
    tok = CaptionTokenizer.load(tok_path)
    model = build_lit(cfg, tok.vocab_size, tok.pad_id)
    missing, unexpected = model.load_state_dict(tensors, strict=False)
    if missing or unexpected:
        raise CheckpointError(f"{final} does not fit the LiT model of this config (missing {missing[:4]}, unexpected "
                              f"{unexpected[:4]}); evaluate it with the config it was trained with")
    return model.to(device).eval(), tok, meta


def zero_shot(model: LiT, tokenize, image_features: torch.Tensor, labels: torch.Tensor,
              classnames, templates, device: torch.device) -> dict:
    """Zero-shot top-1 / top-5 of a LiT model on pooled image features of its (locked) tower;
    ``tokenize`` turns a list of prompts into the text tower's (B, N) ids (``CaptionTokenizer.encode``,
    or MAWS's XLM-R layout)."""
    with torch.no_grad():
        img = model.embed_image_features(image_features.to(device))
        classes = class_embeddings(lambda xs: model.encode_texts(tokenize(xs).to(device)), classnames, templates)
    acc = zero_shot_accuracy(img, labels, classes, ks=(1, 5))
    return {"zero_shot_top1": acc["top1"], "zero_shot_top5": acc["top5"]}


def zero_shot_prompts(cfg: Config, data: DemoData | None) -> tuple[list[str], tuple[str, ...]]:
    """(class names, prompt templates) of the evaluation data: the demo's garments in its caption
    style, or an eval folder's class names (``_`` read as a space) in CLIP-style prompts."""
    if data is not None:
        return list(fmnist.CAPTION_NOUNS), fmnist.CAPTION_TEMPLATES
    src = open_source(eval_format(cfg.data.eval_val), cfg.data.eval_val)
    if not src.classes:
        raise ConfigError(f"config: data.eval_val: {cfg.data.eval_val} names no classes to prompt for zero-shot")
    return [c.replace("_", " ") for c in src.classes], DEFAULT_TEMPLATES


def same_weights(a: torch.nn.Module, b: torch.nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.equal(sa[k].cpu(), sb[k].cpu()) for k in sa)
