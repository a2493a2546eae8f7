"""Captions through both JPEG loaders: a caption JSONL next to a file list, a "caption" in each
shard sample's .json (written by `maws-data shards`), kept with its image when a corrupt sample is
replaced; `maws-data tokenizer`; and the errors of uncaptioned data."""
from __future__ import annotations

import json

import pytest

from maws_fast.data.batching import EvalTransform
from maws_fast.data.images import encode_jpeg
from maws_fast.data.pil_loader import PilLoader
from maws_fast.data.shards import ShardWriter
from maws_fast.data.sources import open_source
from maws_fast.data.text import CaptionTokenizer, TokenizedLoader, source_captions
from maws_fast.cli.data import data_main
from maws_fast.errors import DataError

MEAN, STD = [0.5], [0.25]


def _grey(i: int) -> bytes:
    import numpy as np

    return encode_jpeg(np.full((20, 24), 10 * i, dtype=np.uint8), 95)


def _loader(kind, src, **kw):
    args = dict(batch_size=4, seed=3, mean=MEAN, std=STD, transform=EvalTransform(16, 1.0), targets="caption",
                shuffle=False, channels=1)
    args.update(kw)
    if kind == "dali":
        pytest.importorskip("nvidia.dali")  # the PIL half of every test runs without DALI
        from maws_fast.data.dali import DaliLoader

        return DaliLoader(src, **args)
    return PilLoader(src, **args)


def _captions(loader):
    return [c for _, caps in loader.epoch(0) for c in caps]


@pytest.mark.parametrize("kind", ["pil", "dali"])
def test_shard_captions_come_with_their_images(tmp_path, kind):
    w = ShardWriter(tmp_path / "s", 4)
    for i in range(10):
        w.write(f"{i:06d}", _grey(i), {"tags": [], "caption": f"grey level {10 * i}"})
    w.finish(captions=10)
    src = open_source("webdataset", tmp_path / "s")
    assert _captions(_loader(kind, src)) == [f"grey level {10 * i}" for i in range(10)]


@pytest.mark.parametrize("kind", ["pil", "dali"])
def test_a_replaced_corrupt_sample_takes_its_substitute_caption_too(tmp_path, kind):
    w = ShardWriter(tmp_path / "s", 8)
    for i in range(8):
        w.write(f"{i:06d}", b"\xff\xd8 not a jpeg" if i == 2 else _grey(i), {"caption": f"level {10 * i}"})
    w.finish(captions=8)
    src = open_source("webdataset", tmp_path / "s")
    lines = []
    ld = _loader(kind, src, max_bad=1, log=lines.append)
    batches = [(x, caps) for x, caps in ld.epoch(0)]
    caps = [c for _, b in batches for c in b]
    assert "level 20" not in caps and len(caps) == 8 and lines
    imgs = [x for x, _ in batches]
    import torch

    x = torch.cat(imgs)[:, 0]  # every slot's pixels are those of the sample whose caption it carries
    for img, cap in zip(x, caps):
        level = int(cap.split()[1])
        assert abs(float(img.mean()) * STD[0] + MEAN[0] - level / 255) < 2 / 255, (cap, float(img.mean()))


@pytest.mark.parametrize("kind", ["pil", "dali"])
def test_file_list_captions_from_a_jsonl(tmp_path, kind):
    names = []
    for i in range(6):
        (tmp_path / f"im{i}.jpg").write_bytes(_grey(i))
        names.append(f"im{i}.jpg")
    (tmp_path / "list.txt").write_text("\n".join(names) + "\n")
    rows = [{"file": n, "caption": f"image {i}"} for i, n in enumerate(names)] + [{"file": "other.jpg", "caption": "x"}]
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in reversed(rows)))
    src = open_source("filelist", tmp_path / "list.txt", captions=tmp_path / "caps.jsonl")
    assert _captions(_loader(kind, src)) == [f"image {i}" for i in range(6)]
    tok = CaptionTokenizer.train([f"image {i}" for i in range(6)], 300, 8)
    (x, ids), = list(TokenizedLoader(_loader(kind, src, batch_size=6), tok).epoch(0))
    assert x.shape == (6, 1, 16, 16) and ids.shape == (6, 8) and (ids[:, 0] == 1).all()
    # one image without a caption line: named before any batch is read
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[1:]))
    src = open_source("filelist", tmp_path / "list.txt", captions=tmp_path / "caps.jsonl")
    with pytest.raises(DataError, match="1 of 6 images have no caption .*im0.jpg"):
        _loader(kind, src)


def test_uncaptioned_sources_are_refused(tmp_path):
    w = ShardWriter(tmp_path / "s", 4)
    for i in range(3):
        w.write(f"{i:06d}", _grey(i), {"tags": []})
    w.finish()
    with pytest.raises(DataError, match="hold 0 captions for 3 samples"):
        _loader("pil", open_source("webdataset", tmp_path / "s"))
    (tmp_path / "list.txt").write_text("a.jpg\n")
    with pytest.raises(DataError, match="has no captions"):
        _loader("pil", open_source("filelist", tmp_path / "list.txt"))
    with pytest.raises(DataError, match="goes with a file list"):
        open_source("webdataset", tmp_path / "s", captions=tmp_path / "caps.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"file": "a.jpg", "caption": 7}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        open_source("filelist", tmp_path / "list.txt", captions=tmp_path / "bad.jsonl")


def test_maws_data_writes_and_cleans_captioned_shards_and_trains_a_tokenizer(tmp_path, capsys):
    for i in range(5):
        (tmp_path / f"im{i}.jpg").write_bytes(_grey(i))
    (tmp_path / "list.txt").write_text("".join(f"im{i}.jpg\n" for i in range(5)))
    (tmp_path / "caps.jsonl").write_text("".join(json.dumps({"file": f"im{i}.jpg", "caption": f"a grey photo {i}"}) + "\n"
                                                 for i in range(5)))
    assert data_main(["shards", "--list", str(tmp_path / "list.txt"), "--captions", str(tmp_path / "caps.jsonl"),
                      "--out", str(tmp_path / "sh"), "--samples-per-shard", "2", "--workers", "1"]) == 0
    src = open_source("webdataset", tmp_path / "sh")
    assert src.shards.manifest["captions"] == 5
    assert sorted(source_captions(src)) == [f"a grey photo {i}" for i in range(5)]
    assert data_main(["verify", "--shards", str(tmp_path / "sh"), "--write-clean", str(tmp_path / "clean"),
                      "--workers", "1"]) == 0
    assert open_source("webdataset", tmp_path / "clean").shards.manifest["captions"] == 5
    assert data_main(["tokenizer", "--shards", str(tmp_path / "sh"), "--out", str(tmp_path / "tok.json"),
                      "--vocab-size", "300", "--context-length", "12"]) == 0
    assert "wrote" in capsys.readouterr().out
    tok = CaptionTokenizer.load(tmp_path / "tok.json")
    assert tok.context_length == 12
    assert data_main(["tokenizer", "--captions", str(tmp_path / "caps.jsonl"), "--out", str(tmp_path / "tok.json")]) == 2
    assert "already exists" in capsys.readouterr().err
    assert data_main(["shards", "--folder", str(tmp_path), "--captions", str(tmp_path / "caps.jsonl"),
                      "--out", str(tmp_path / "x")]) == 2
