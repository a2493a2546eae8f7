"""``maws-data``: write, check and describe image datasets.

* ``shards``: an image folder, a file list (+ hashtag JSONL) or Fashion-MNIST -> webdataset shards
  with DALI indexes (:mod:`maws_fast.data.shards`). Every input is decoded in full before anything
  is written; inputs that do not decode are skipped and listed in ``rejected.tsv``, and more than
  ``--max-bad`` of them fail the command before a shard is written. The sample list is shuffled
  with ``--seed`` before it is cut into shards, because container readers only shuffle within a
  buffer.
* ``verify``: decode every sample of shards, a folder or a file list; name each bad one; optionally
  write a clean copy (a file list, or shard indexes that leave the bad samples out).
* ``stats``: counts, class / tag histograms and image sizes (headers only, no decode). Without a
  source flag it describes Fashion-MNIST and its weak hashtags, as it always has.
* ``vocab``: a hashtag vocabulary from a JSONL of string tags.
* ``tokenizer``: the LiT caption tokenizer, trained on captions.

The work beneath ``shards`` and ``verify`` (decode checks, inputs, clean indexes) is in
:mod:`maws_fast.cli.data_shards`. Errors a user can cause are :class:`~maws_fast.errors.UserError`:
one line on stderr, exit 2.
"""

from __future__ import annotations

import argparse
import os
import sys
from collections import Counter
from pathlib import Path

import numpy as np

from maws_fast.cli.common import quiet_broken_pipe
from maws_fast.cli.data_shards import (
    VOCAB_FILE, check_file, pmap, read_tag_rows, shard_inputs, short_name, tag_counts, verify_shards, vocab_for_list,
    write_clean_shards,
)
from maws_fast.data.images import ImageInfo, inspect_image
from maws_fast.data.shards import ShardReader, ShardSample, ShardWriter, open_shards, parse_meta
from maws_fast.data.sources import (Vocab, build_vocab, open_source, read_file_list, resample_indices, scan_folder,
                                    vocab_coverage)
from maws_fast.errors import DataError, UserError
from maws_fast.storage import atomic_write_text

PROG = "maws-data"
REJECTED = "rejected.tsv"
KEY_DIGITS = 9  # zero-padded running numbers: keys sort in write order up to a billion samples
SHOW = 3  # bad inputs named in an error line; the rest are in rejected.tsv
SHOW_SUMMARY = 10  # bad inputs listed in the summary
TOP_TAGS = 20


def _one_line(s: str) -> str:
    return " ".join(str(s).split())


# --- shards --------------------------------------------------------------------------------------
def cmd_shards(a: argparse.Namespace) -> int:
    for flag, v, lo in (("--samples-per-shard", a.samples_per_shard, 1), ("--workers", a.workers, 1),
                        ("--max-bad", a.max_bad, 0), ("--num", a.num, 1), ("--weak-hashtags", a.weak_hashtags, 1)):
        if v is not None and v < lo:
            raise UserError(f"{flag} must be >= {lo}, got {v}")
    if not 1 <= a.quality <= 100:
        raise UserError(f"--quality must be in 1..100, got {a.quality}")
    if not a.fmnist and a.weak_hashtags is not None:
        raise UserError("--weak-hashtags only applies to --fmnist")
    if a.list is None and (a.tags or a.vocab or a.captions):
        raise UserError("--tags, --vocab and --captions only apply to --list")
    inputs = shard_inputs(a)
    n = len(inputs.names)
    writer = ShardWriter(a.out, a.samples_per_shard)  # refuses a directory that already holds shards
    out = writer.out

    # Pass 1: decode every input once; nothing is written unless the bad ones are few enough.
    reasons = list(pmap(inputs.check, range(n), a.workers, "verify")) if inputs.files else [""] * n
    bad = [i for i, r in enumerate(reasons) if r]
    rows = "".join(f"{inputs.names[i]}\t{_one_line(reasons[i])}\n" for i in bad)
    atomic_write_text(out / REJECTED, "file\treason\n" + rows)
    if len(bad) > a.max_bad:
        first = ", ".join(inputs.names[i] for i in bad[:SHOW]) + (", ..." if len(bad) > SHOW else "")
        raise DataError(f"{len(bad)} of {n} inputs do not decode ({first}); each is listed with its reason in "
                        f"{out / REJECTED}; fix or remove them, or pass --max-bad {len(bad)} to skip them")
    good = np.array([i for i, r in enumerate(reasons) if not r], dtype=np.int64)
    if not good.size:
        raise DataError(f"none of the {n} inputs decodes; see {out / REJECTED}")

    # Choose the samples, then shuffle the whole list before cutting shards.
    if a.resample == "inv_sqrt":
        tag_lists = [inputs.tags[i] for i in good]
        if not any(tag_lists):
            raise UserError("--resample inv_sqrt needs tagged inputs (a folder, --list with --tags, or --fmnist)")
        chosen = good[resample_indices(tag_lists, tag_counts(inputs), a.num or len(good), a.seed)]
    elif a.num is not None and a.num > len(good):
        raise UserError(f"--num {a.num} is more than the {len(good)} good inputs; use --resample inv_sqrt to draw more")
    else:
        chosen = good
    # A second stream of the same seed: the resampling draws are not reused for the order.
    chosen = chosen[np.random.default_rng([a.seed, 1]).permutation(len(chosen))]
    if a.resample == "none" and a.num is not None:
        chosen = chosen[: a.num]

    # Pass 2: write. JPEG inputs are copied, others re-encoded (on the worker threads).
    if inputs.vocab is not None:
        inputs.vocab.save(out / VOCAB_FILE)
    payloads = pmap(lambda i: inputs.payload(i, a.quality), chosen.tolist(), a.workers, "write")
    captioned = 0
    for k, (i, jpeg) in enumerate(zip(chosen.tolist(), payloads)):
        meta: dict = {"tags": inputs.tags[i]}
        if inputs.labels is not None:
            meta["label"] = inputs.labels[i]
        meta["src"] = inputs.srcs[i]
        if inputs.captions is not None and inputs.captions[i] is not None:
            meta["caption"] = inputs.captions[i]
            captioned += 1
        writer.write(f"{k:0{KEY_DIGITS}d}", jpeg, meta)
    writer.finish(rejected=len(bad), seed=a.seed, resample=a.resample, captions=captioned, **inputs.manifest)

    for i in bad[:SHOW_SUMMARY]:
        print(f"rejected {inputs.names[i]}: {_one_line(reasons[i])}")
    if len(bad) > SHOW_SUMMARY:
        print(f"... and {len(bad) - SHOW_SUMMARY} more in {out / REJECTED}")
    print(f"wrote {writer.count} samples in {len(writer.shards)} shards to {out}; {len(bad)} of {n} inputs rejected"
          + (f" (listed in {out / REJECTED})" if bad else ""))
    return 0


# --- verify --------------------------------------------------------------------------------------
def cmd_verify(a: argparse.Namespace) -> int:
    if a.workers < 1:
        raise UserError(f"--workers must be >= 1, got {a.workers}")
    if a.shards is not None:
        shards, names, reasons = verify_shards(a.shards, a.workers)
    else:
        src = scan_folder(a.folder) if a.folder is not None else read_file_list(a.list, None, None)
        names = src.paths
        reasons = list(pmap(check_file, names, a.workers, "verify"))
    bad = [(nm, r) for nm, r in zip(names, reasons) if r]
    for nm, r in bad:
        print(f"{nm}: {_one_line(r)}")
    print(f"{len(names)} samples, {len(bad)} bad")
    if a.write_clean:
        if not len(names) - len(bad):
            raise DataError("every sample is bad; no clean copy written")
        dest = Path(a.write_clean)
        if a.shards is not None:
            print(f"clean copy: {write_clean_shards(shards, reasons, dest)} ({len(names) - len(bad)} samples)")
        else:
            dest.parent.mkdir(parents=True, exist_ok=True)
            atomic_write_text(dest, "".join(os.path.abspath(nm) + "\n" for nm, r in zip(names, reasons) if not r))
            print(f"clean list: {dest} ({len(names) - len(bad)} files)")
    return 1 if bad else 0


# --- stats ---------------------------------------------------------------------------------------
def _fmnist_stats(a: argparse.Namespace) -> None:
    """The Fashion-MNIST splits and the weak-hashtag histogram (the original ``maws-data stats``)."""
    import torch

    from maws_fast.data import fmnist

    for split in ("train", "test"):
        x, y = fmnist.load_fmnist(a.data, split)
        counts = torch.bincount(y, minlength=10).tolist()
        print(f"{split}: {len(y)} images of {tuple(x.shape[1:])} uint8; per class {counts}")
    x, y = fmnist.load_fmnist(a.data, "train")
    _, tags = fmnist.make_weak_hashtags(x, y, a.num, seed=a.seed)
    per_tag = tags.sum(0).long().tolist()
    print(f"weak hashtags: {a.num} mosaics, {tags.sum(1).mean():.2f} tags per image on average")
    for name, n in zip(fmnist.VOCAB, per_tag):
        print(f"  {name:<14} {n}")


def _print_stats(title: str, infos: list[ImageInfo], names: list[str], labels: list | None,
                 classes: list[str] | None, tags: list[list[int]] | None, vocab: Vocab | None) -> None:
    print(f"{title}: {len(infos)} samples")
    if labels is not None and any(lb is not None for lb in labels):
        per = Counter(lb for lb in labels if lb is not None)
        n_cls = len(classes) if classes else max(per) + 1
        print(f"per class ({n_cls} classes{', ' + str(labels.count(None)) + ' unlabelled' if None in labels else ''}):")
        for c in range(n_cls):
            print(f"  {classes[c] if classes else c:<24} {per.get(c, 0)}")
    if tags is not None and (labels is None or vocab is not None):  # a folder's tags are its labels
        per = Counter(t for row in tags for t in set(row))
        size = f"{len(vocab)} in the vocabulary, " if vocab else ""
        print(f"tags: {size}{len(per)} used; {np.mean([len(r) for r in tags]) if tags else 0:.2f} tags per image on "
              f"average, {sum(1 for r in tags if not r)} untagged; top {min(TOP_TAGS, len(per))}:")
        for t, c in sorted(per.items(), key=lambda tc: (-tc[1], tc[0]))[:TOP_TAGS]:
            name = vocab.tags[t] if vocab and 0 <= t < len(vocab) else str(t)
            print(f"  {name:<24} {c}")
    ok = [i for i in infos if i.ok]
    if ok:
        h, w = np.array([i.height for i in ok]), np.array([i.width for i in ok])
        print(f"image size (from the headers): height min/median/max {h.min()}/{int(np.median(h))}/{h.max()}, "
              f"width min/median/max {w.min()}/{int(np.median(w))}/{w.max()}")
    fmts = Counter(i.format for i in ok)
    print(f"formats: {', '.join(f'{f} {c}' for f, c in sorted(fmts.items())) or 'none'}; "
          f"progressive {sum(i.progressive for i in ok)}; grey {sum(i.channels in (1, 2) for i in ok)}; "
          f"bad headers {len(infos) - len(ok)}")
    for nm, i in [(nm, i) for nm, i in zip(names, infos) if not i.ok][:SHOW_SUMMARY]:
        print(f"  {nm}: {i.problem}")


def _inspect_file(path: str) -> ImageInfo:
    try:
        return inspect_image(Path(path).read_bytes())
    except OSError as e:
        return ImageInfo("", problem=f"cannot read ({e.strerror})")


def cmd_stats(a: argparse.Namespace) -> int:
    if a.workers < 1:
        raise UserError(f"--workers must be >= 1, got {a.workers}")
    if a.list is None and (a.tags or a.vocab):
        raise UserError("--tags and --vocab only apply to --list")
    if a.folder is not None:
        src = scan_folder(a.folder)
        infos = list(pmap(_inspect_file, src.paths, a.workers, "stats"))
        _print_stats(f"folder {a.folder}", infos, src.paths, src.labels, src.classes, None, None)
    elif a.list is not None:
        vocab = vocab_for_list(a.tags, a.vocab)
        src = read_file_list(a.list, a.tags, vocab)
        infos = list(pmap(_inspect_file, src.paths, a.workers, "stats"))
        _print_stats(f"list {a.list}", infos, src.paths, None, None, src.tags if a.tags else None, vocab)
    elif a.shards is not None:
        shards = open_shards(a.shards)
        m = shards.manifest
        vocab = Vocab.load(shards.root / m["vocab"]) if m.get("vocab") else None
        reader = ShardReader()

        def one(s: ShardSample) -> tuple[ImageInfo, dict]:
            try:
                jpg, raw = reader.read_raw(s)
                return inspect_image(jpg), parse_meta(raw, short_name(s))
            except DataError as e:
                return ImageInfo("", problem=str(e)), {}

        try:
            rows = list(pmap(one, shards.samples, a.workers, "stats"))
        finally:
            reader.close()
        labels = [meta.get("label") for _, meta in rows]
        tags = [meta.get("tags", []) for _, meta in rows]
        _print_stats(f"shards {a.shards}", [i for i, _ in rows], [short_name(s) for s in shards.samples],
                     labels if any(lb is not None for lb in labels) else None, m.get("classes"), tags, vocab)
    else:
        _fmnist_stats(a)
    return 0


# --- vocab ---------------------------------------------------------------------------------------
def cmd_vocab(a: argparse.Namespace) -> int:
    rows = read_tag_rows(a.tags)
    if any(not isinstance(t, str) for row in rows for t in row):
        raise DataError(f"{a.tags} holds tag ids, not tag strings; a vocabulary maps strings to ids, so this file "
                        "needs none")
    if a.min_count < 1 or (a.max_size is not None and a.max_size < 1):
        raise UserError("--min-count and --max-size must be >= 1")
    vocab = build_vocab(rows, a.min_count, a.max_size)
    out = Path(a.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    vocab.save(out)
    rule = f"seen on >= {a.min_count} images" + (f", the {a.max_size} most frequent" if a.max_size else "")
    print(f"vocabulary of {len(vocab)} tags ({rule}; least frequent kept: {vocab.counts[-1]} images) -> {out}")
    print(vocab_coverage(rows, vocab).summary())
    return 0


# --- tokenizer -----------------------------------------------------------------------------------
def cmd_tokenizer(a: argparse.Namespace) -> int:
    from maws_fast.data.text import CaptionTokenizer, read_captions, source_captions

    out = Path(a.out)
    if out.exists():
        raise UserError(f"{out} already exists; pass a new --out (a tokenizer is never overwritten)")
    if a.shards is not None:
        captions = source_captions(open_source("webdataset", a.shards))
    else:
        captions = read_captions(a.captions)
    tok = CaptionTokenizer.train(captions, a.vocab_size, a.context_length)
    out.parent.mkdir(parents=True, exist_ok=True)
    tok.save(out)
    ids = tok.encode(captions[:10000])
    cut = int((ids[:, -1] != tok.pad_id).sum())
    print(f"wrote {out}: a byte-level BPE of {tok.vocab_size} tokens from {len(captions)} captions, context "
          f"{tok.context_length} tokens ({cut} of the first {len(ids)} captions fill or exceed it); use it as "
          f"--lit.tokenizer={out}")
    return 0


# --- command line --------------------------------------------------------------------------------
class _DefaultsFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """Appends ``(default: X)`` to a flag's help, except where there is none (None, a store_true's False) or the
    help says its own default already."""

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.default is None or action.default is False or "default" in (action.help or ""):
            return action.help or ""
        return super()._get_help_string(action)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog=PROG, description="Dataset tools: write, verify and describe image datasets.",
                                formatter_class=_DefaultsFormatter)
    sub = p.add_subparsers(dest="cmd", required=True)
    workers = min(8, os.cpu_count() or 1)

    sh = sub.add_parser("shards", help="webdataset shards + DALI indexes from a folder, a file list or Fashion-MNIST")
    sh.add_argument("--out", required=True, help="new shard directory")
    src = sh.add_mutually_exclusive_group(required=True)
    src.add_argument("--folder", help="image folder DIR/<class>/<image>.{jpg,jpeg,png}")
    src.add_argument("--list", help="text file of image paths, one per line (relative to its folder)")
    src.add_argument("--fmnist", action="store_true", help="Fashion-MNIST as 28x28 grey JPEGs")
    sh.add_argument("--tags", help='--list: JSONL with one {"file": path, "tags": [...]} per image')
    sh.add_argument("--vocab", help="--list: vocabulary for string tags (default: built from --tags)")
    sh.add_argument("--captions", help='--list: JSONL with one {"file": path, "caption": "..."} per image (LiT); '
                                       "--fmnist --weak-hashtags writes captions from the tags itself")
    sh.add_argument("--data", help="--fmnist: Fashion-MNIST directory (default: Debian's package location)")
    sh.add_argument("--split", choices=("train", "test"), default="train", help="--fmnist: split to write")
    sh.add_argument("--weak-hashtags", type=int, help="--fmnist: write N weak-hashtag mosaics instead of the split")
    sh.add_argument("--samples-per-shard", type=int, default=1000,
                    help="samples per .tar shard (the last may hold fewer)")
    sh.add_argument("--seed", type=int, default=0, help="seeds the shuffle, the resampling and the weak hashtags")
    sh.add_argument("--quality", type=int, default=95, help="JPEG quality of re-encoded inputs")
    sh.add_argument("--resample", choices=("none", "inv_sqrt"), default="none",
                    help="inv_sqrt: draw samples by inverse-sqrt tag frequency (Mahajan et al. 2018)")
    sh.add_argument("--num", type=int, help="samples to write (default: every good input)")
    sh.add_argument("--max-bad", type=int, default=0, help="inputs that may fail to decode and be skipped")
    sh.add_argument("--workers", type=int, default=workers, help="decode threads")

    ve = sub.add_parser("verify", help="decode every sample; name the bad ones")
    src = ve.add_mutually_exclusive_group(required=True)
    src.add_argument("--shards", help="shard directory")
    src.add_argument("--folder", help="image folder")
    src.add_argument("--list", help="file list")
    ve.add_argument("--write-clean", help="shards: DIR for indexes + manifest without the bad samples; "
                                          "folder/list: FILE listing the good images")
    ve.add_argument("--workers", type=int, default=workers, help="decode threads")

    st = sub.add_parser("stats", help="counts, class / tag histograms, image sizes (default: Fashion-MNIST)")
    src = st.add_mutually_exclusive_group()
    src.add_argument("--shards", help="shard directory")
    src.add_argument("--folder", help="image folder")
    src.add_argument("--list", help="file list")
    src.add_argument("--fmnist", action="store_true", help="Fashion-MNIST and its weak hashtags (the default)")
    st.add_argument("--tags", help="--list: hashtag JSONL")
    st.add_argument("--vocab", help="--list: vocabulary for string tags (default: built from --tags)")
    st.add_argument("--data", help="--fmnist: Fashion-MNIST directory (default: Debian's package location)")
    st.add_argument("--num", type=int, default=60000, help="--fmnist: weak-hashtag mosaics to generate")
    st.add_argument("--seed", type=int, default=0, help="--fmnist: seeds the weak hashtags")
    st.add_argument("--workers", type=int, default=workers, help="reader threads")

    vo = sub.add_parser("vocab", help="build a hashtag vocabulary from a JSONL of string tags")
    vo.add_argument("--tags", required=True, help='JSONL with one {"file": path, "tags": ["tag", ...]} per image')
    vo.add_argument("--out", required=True, help="vocabulary JSON to write")
    vo.add_argument("--min-count", type=int, default=1, help="keep tags seen on at least this many images")
    vo.add_argument("--max-size", type=int, default=None,
                    help="then keep at most this many, the most frequent (MAWS / SWAG: ~28K canonical hashtags; "
                         "default: no cap)")

    tk = sub.add_parser("tokenizer", help="train the LiT caption tokenizer (a byte-level BPE, tokenizer.json)")
    src = tk.add_mutually_exclusive_group(required=True)
    src.add_argument("--captions", help='captions: a .jsonl of {"caption": "..."} rows (a file list\'s caption JSONL) '
                                        "or a .txt, one per line")
    src.add_argument("--shards", help="shard directory whose samples carry captions")
    tk.add_argument("--out", required=True, help="tokenizer.json to write")
    tk.add_argument("--vocab-size", type=int, default=1000, help="tokens, the 256 bytes and 3 specials included")
    tk.add_argument("--context-length", type=int, default=40, help="tokens per caption, [CLS] and [EOS] included")
    for cmd in sub.choices.values():  # add_parser does not pass the formatter on
        cmd.formatter_class = _DefaultsFormatter
    return p


COMMANDS = {"shards": cmd_shards, "verify": cmd_verify, "stats": cmd_stats, "vocab": cmd_vocab,
            "tokenizer": cmd_tokenizer}


@quiet_broken_pipe
def data_main(argv: list[str] | None = None) -> int:
    """``maws-data shards|verify|stats|vocab|tokenizer [...]``; returns the exit status (2 for a user error).

    Args:
        argv: the arguments after the program name (default: ``sys.argv[1:]``).
    """
    args = _parser().parse_args(argv)
    try:
        return COMMANDS[args.cmd](args)
    except UserError as e:
        print(f"{PROG}: error: {_one_line(e)}", file=sys.stderr)
        return 2
