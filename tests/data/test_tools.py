"""maws-data shards / verify / stats / vocab, run in-process on real photographs and Fashion-MNIST."""

from __future__ import annotations

import io
import json
import os
from pathlib import Path

import numpy as np
import pytest

from maws_fast.data import fmnist
from maws_fast.data.images import decode_pil, inspect_image
from maws_fast.data.shards import ShardReader, ShardWriter, open_shards
from maws_fast.data.sources import Vocab, build_vocab
from maws_fast.cli.data import data_main
from tests.data.photos import decode_reference, write_folder

from conftest import needs_fmnist  # noqa: E402




def _run(capsys, *argv: str) -> tuple[int, str, str]:
    rc = data_main([str(a) for a in argv])
    cap = capsys.readouterr()
    return rc, cap.out, cap.err


def _samples(out: Path) -> list[tuple[str, bytes, dict]]:
    """``(key, jpeg, meta)`` of every sample, read back through the index offsets."""
    shards = open_shards(out)
    reader = ShardReader()
    rows = [(s.key, *reader.read(s)) for s in shards.samples]
    reader.close()
    return rows


@pytest.fixture
def folder(tmp_path, real_images, broken_images) -> Path:
    write_folder(tmp_path / "photos", {**real_images, **broken_images}, classes=2)
    return tmp_path / "photos"


# --- shards --------------------------------------------------------------------------------------
def test_shards_from_folder(tmp_path, capsys, folder, real_images):
    out = tmp_path / "shards"
    rc, stdout, _ = _run(capsys, "shards", "--folder", folder, "--out", out, "--max-bad", 2, "--samples-per-shard", 4)
    assert rc == 0
    n = len(real_images)
    manifest = json.loads((out / "manifest.json").read_text())
    assert manifest["num_samples"] == n and manifest["rejected"] == 2 and manifest["classes"] == ["class_0", "class_1"]
    assert [s["samples"] for s in manifest["shards"]] == [4, 4, n - 8]
    assert f"wrote {n} samples in 3 shards to {out}; 2 of {n + 2} inputs rejected" in stdout
    rejected = (out / "rejected.tsv").read_text().splitlines()
    assert rejected[0] == "file\treason" and len(rejected) == 3
    assert {Path(r.split("\t")[0]).stem for r in rejected[1:]} == {"truncated", "not_an_image"}
    assert "truncated" in stdout and "not_an_image" in stdout

    rows = _samples(out)
    assert [k for k, _, _ in rows] == [f"{k:09d}" for k in range(n)]
    assert sorted(Path(m["src"]).stem for _, _, m in rows) == sorted(real_images)
    for _, jpg, meta in rows:
        original = (folder / meta["src"]).read_bytes()
        assert meta["label"] == int(Path(meta["src"]).parent.name[-1]) and meta["tags"] == [meta["label"]]
        if original[:2] == b"\xff\xd8":
            assert jpg == original, meta["src"]  # JPEG inputs are stored byte for byte
        else:
            info = inspect_image(jpg)
            assert info.ok and info.format == "jpeg" and info.channels == 3
            # q95 with PIL's default 4:2:0 chroma subsampling: a few levels on a 96x96 photo.
            err = np.abs(decode_pil(jpg).astype(int) - decode_reference(original)).mean()
            assert err < 5, err


def test_shards_refuse_a_non_empty_directory_that_is_not_a_shard_output(tmp_path, capsys, folder):
    rc, _, err = _run(capsys, "shards", "--folder", folder, "--out", folder, "--max-bad", 2)
    assert rc == 2 and "is not empty and not an earlier shard output" in err and err.strip().count("\n") == 0
    assert not any(p.name.startswith("shard-") for p in folder.iterdir())  # the photos folder is untouched
    # what an interrupted shard write leaves is fine to write over
    out = tmp_path / "shards"
    out.mkdir()
    (out / "shard-000000.tar.tmp").write_bytes(b"torn")
    rc, _, _ = _run(capsys, "shards", "--folder", folder, "--out", out, "--max-bad", 2)
    assert rc == 0 and not (out / "shard-000000.tar.tmp").exists()


def test_shards_reencode_what_the_loaders_would_not_take(tmp_path, capsys, real_images):
    """A JPEG with a trailer after its end marker (kept as is), CMYK (re-encoded to RGB), a grey PNG."""
    from PIL import Image

    rgb = Image.fromarray(decode_pil(real_images["flower_odd"]))
    cmyk, grey = io.BytesIO(), io.BytesIO()
    rgb.convert("CMYK").save(cmyk, "JPEG", quality=90)
    rgb.convert("L").save(grey, "PNG")
    files = {"trailer": real_images["flower_odd"] + b"\0" * 100, "cmyk": cmyk.getvalue(), "grey": grey.getvalue()}
    write_folder(tmp_path / "in", files, classes=1)
    rc, out, _ = _run(capsys, "verify", "--folder", tmp_path / "in")
    assert rc == 0 and "3 samples, 0 bad" in out  # phones append trailers: not a truncation

    assert _run(capsys, "shards", "--folder", tmp_path / "in", "--out", tmp_path / "s")[0] == 0
    stored = {Path(m["src"]).stem: jpg for _, jpg, m in _samples(tmp_path / "s")}
    infos = {k: inspect_image(v) for k, v in stored.items()}
    assert all(i.ok and i.format == "jpeg" for i in infos.values())
    assert stored["trailer"] == files["trailer"] and infos["cmyk"].channels == 3 and infos["grey"].channels == 1
    assert np.abs(decode_pil(stored["grey"], "L").astype(int) - np.asarray(rgb.convert("L"))).mean() < 3
    assert _run(capsys, "verify", "--shards", tmp_path / "s")[0] == 0


def test_shards_same_bytes_with_any_worker_count(tmp_path, capsys, folder):
    common = ["--folder", folder, "--max-bad", 2, "--samples-per-shard", 5]
    assert _run(capsys, "shards", *common, "--out", tmp_path / "a", "--workers", 1)[0] == 0
    assert _run(capsys, "shards", *common, "--out", tmp_path / "b", "--workers", 3)[0] == 0
    for name in ("shard-000000.tar", "shard-000001.idx", "manifest.json", "rejected.tsv"):
        assert (tmp_path / "a" / name).read_bytes() == (tmp_path / "b" / name).read_bytes(), name


def test_shuffle_order_depends_on_seed(tmp_path, capsys, folder):
    def order(seed: int, out: str) -> list[str]:
        args = ["shards", "--folder", folder, "--out", tmp_path / out, "--max-bad", 2, "--seed", seed]
        assert _run(capsys, *args, "--samples-per-shard", 3)[0] == 0
        return [m["src"] for _, _, m in _samples(tmp_path / out)]

    first, again, other = order(0, "s0"), order(0, "s0b"), order(1, "s1")
    assert first == again and first != other and sorted(first) == sorted(other)
    assert first != sorted(first)  # shuffled across shards, not written in folder order


def test_too_many_bad_inputs_fail_before_writing(tmp_path, capsys, folder):
    out = tmp_path / "shards"
    rc, _, err = _run(capsys, "shards", "--folder", folder, "--out", out, "--max-bad", 1)
    assert rc == 2 and err.count("\n") == 1 and err.startswith("maws-data: error: 2 of ")
    assert "truncated.jpg" in err and "not_an_image.jpg" in err and str(out / "rejected.tsv") in err
    assert "--max-bad 2" in err
    assert not (out / "manifest.json").exists() and not list(out.glob("*.tar*"))
    assert len((out / "rejected.tsv").read_text().splitlines()) == 3


def _tagged_list(root: Path, image: bytes, tags: list[list[str]]) -> tuple[Path, Path]:
    """``root/list.txt`` of copies of ``image`` and ``root/tags.jsonl`` giving copy i the tags[i]."""
    (root / "img").mkdir(parents=True)
    names = []
    for i in range(len(tags)):
        (root / "img" / f"{i:03d}.jpg").write_bytes(image)
        names.append(f"img/{i:03d}.jpg")
    (root / "list.txt").write_text("".join(n + "\n" for n in names))
    (root / "tags.jsonl").write_text("".join(json.dumps({"file": n, "tags": t}) + "\n" for n, t in zip(names, tags)))
    return root / "list.txt", root / "tags.jsonl"


def test_shards_from_list_with_string_tags(tmp_path, capsys, real_images):
    tags = [["cat", "sky"], ["dog"], ["cat"], ["cat", "dog", "tree"], []]
    lst, jsonl = _tagged_list(tmp_path / "in", real_images["flower_odd"], tags)
    out = tmp_path / "built"
    assert _run(capsys, "shards", "--list", lst, "--tags", jsonl, "--out", out)[0] == 0
    vocab = Vocab.load(out / "vocab.json")
    expected = build_vocab(tags)
    assert vocab.tags == expected.tags == ["cat", "dog", "sky", "tree"] and vocab.counts == [3, 2, 1, 1]
    assert json.loads((out / "manifest.json").read_text())["vocab"] == "vocab.json"
    for _, jpg, meta in _samples(out):
        i = int(Path(meta["src"]).stem)
        assert meta["src"] == f"img/{i:03d}.jpg" and "label" not in meta
        assert meta["tags"] == sorted(vocab.id(t) for t in tags[i])
        assert jpg == real_images["flower_odd"]

    # A given vocabulary is used (and copied), in its own order; tags outside it are dropped.
    given = Vocab(["tree", "dog", "cat"], [1, 2, 3])
    given.save(tmp_path / "given.json")
    out2 = tmp_path / "given"
    args = ["shards", "--list", lst, "--tags", jsonl, "--vocab", tmp_path / "given.json", "--out", out2]
    assert _run(capsys, *args)[0] == 0
    assert Vocab.load(out2 / "vocab.json").tags == given.tags
    for _, _, meta in _samples(out2):
        i = int(Path(meta["src"]).stem)
        assert meta["tags"] == sorted(given.id(t) for t in tags[i] if t != "sky")


def test_resample_inv_sqrt_draws_rare_tags_more_often(tmp_path, capsys, real_images):
    tags = [["common"]] * 36 + [["rare"]] * 4  # rare on 10% of the inputs
    lst, jsonl = _tagged_list(tmp_path / "in", real_images["flower_odd"], tags)
    out = tmp_path / "res"
    args = ["shards", "--list", lst, "--tags", jsonl, "--out", out, "--resample", "inv_sqrt", "--num", 400]
    assert _run(capsys, *args, "--seed", 7, "--samples-per-shard", 100)[0] == 0
    rows = _samples(out)
    rare = Vocab.load(out / "vocab.json").id("rare")
    frac = np.mean([rare in m["tags"] for _, _, m in rows])
    # Expected 4 * 4**-0.5 / (4 * 4**-0.5 + 36 * 36**-0.5) = 0.25; the input ratio is 0.10.
    assert len(rows) == 400 and 0.18 < frac < 0.32, frac
    assert len({m["src"] for _, _, m in rows}) == 40  # drawn with replacement from every input

    # Without resampling, --num takes a shuffled subset of distinct inputs.
    assert _run(capsys, "shards", "--list", lst, "--out", tmp_path / "sub", "--num", 10)[0] == 0
    metas = [m for _, _, m in _samples(tmp_path / "sub")]
    assert len({m["src"] for m in metas}) == len(metas) == 10 and all(m["tags"] == [] for m in metas)


@needs_fmnist
def test_shards_fmnist_weak_hashtags(tmp_path, capsys):
    out = tmp_path / "weak"
    assert _run(capsys, "shards", "--fmnist", "--weak-hashtags", 200, "--seed", 5, "--out", out)[0] == 0
    x, y = fmnist.load_fmnist(None, "train")
    mosaics, multi_hot = fmnist.make_weak_hashtags(x, y, 200, seed=5)
    vocab = Vocab.load(out / "vocab.json")
    assert vocab.tags == list(fmnist.VOCAB) and vocab.counts == multi_hot.sum(0).long().tolist()
    rows = _samples(out)
    assert len(rows) == 200 and json.loads((out / "manifest.json").read_text())["vocab"] == "vocab.json"
    srcs = [int(m["src"].rsplit(":", 1)[1]) for _, _, m in rows]
    assert sorted(srcs) == list(range(200)) and srcs != sorted(srcs)
    errs = []
    for (_, jpg, meta), i in zip(rows, srcs):
        assert meta["tags"] == np.flatnonzero(multi_hot[i].numpy()).tolist() and "label" not in meta
        assert inspect_image(jpg).channels == 1
        errs.append(np.abs(decode_pil(jpg, "L").astype(int) - mosaics[i].numpy()).mean())
    assert np.mean(errs) < 3 and max(errs) < 6


@needs_fmnist
def test_shards_fmnist_test_split(tmp_path, capsys):
    out = tmp_path / "test"
    assert _run(capsys, "shards", "--fmnist", "--split", "test", "--num", 300, "--out", out)[0] == 0
    x, y = fmnist.load_fmnist(None, "test")
    assert json.loads((out / "manifest.json").read_text())["classes"] == list(fmnist.CLASSES)
    rows = _samples(out)
    assert len(rows) == 300
    for _, jpg, meta in rows:
        i = int(meta["src"].rsplit(":", 1)[1])
        assert meta["src"].startswith("fmnist-test:") and meta["label"] == int(y[i]) and meta["tags"] == [int(y[i])]
        px = decode_pil(jpg, "L")
        assert px.shape == (28, 28) and np.abs(px.astype(int) - x[i].numpy()).mean() < 3


# --- verify --------------------------------------------------------------------------------------
def test_verify_shards_names_bad_samples_and_writes_clean_indexes(tmp_path, capsys, real_images, broken_images):
    w = ShardWriter(tmp_path / "raw", 3)  # bypasses the shards command's checks
    good = {}
    items = [("china", real_images["china"]), ("trunc", broken_images["truncated"]),
             ("rocket", real_images["rocket"]), ("flower", real_images["flower"]),
             ("text", broken_images["not_an_image"]), ("gray", real_images["flower_gray"])]
    for k, (name, data) in enumerate(items):
        w.write(f"{k:09d}", data, {"tags": [k], "label": k % 2, "src": name})
        if name not in ("trunc", "text"):
            good[f"{k:09d}"] = data
    w.write(f"{len(items):09d}", real_images["retina"], {"tags": "oops"})  # bad metadata
    w.finish(classes=["a", "b"])

    rc, out, _ = _run(capsys, "verify", "--shards", tmp_path / "raw", "--write-clean", tmp_path / "clean")
    assert rc == 1
    lines = out.splitlines()
    assert any(ln.startswith("shard-000000.tar:000000001: does not decode") and "truncated" in ln for ln in lines)
    assert any(ln.startswith("shard-000001.tar:000000004: does not decode") for ln in lines)
    assert any(ln.startswith("shard-000002.tar:000000006:") and "tags must be a list" in ln for ln in lines)
    assert "7 samples, 3 bad" in lines
    clean = open_shards(tmp_path / "clean")
    assert [s.key for s in clean.samples] == sorted(good)
    assert len(clean.tars) == 2  # the last shard held only the bad-metadata sample
    assert all(Path(t).is_absolute() for t in clean.tars) and clean.manifest["classes"] == ["a", "b"]
    assert all(jpg == good[k] for k, jpg, _ in _samples(tmp_path / "clean"))
    # The clean copy verifies clean.
    rc, out, _ = _run(capsys, "verify", "--shards", tmp_path / "clean")
    assert rc == 0 and "4 samples, 0 bad" in out


def test_verify_folder_and_clean_list(tmp_path, capsys, folder, real_images):
    rc, out, _ = _run(capsys, "verify", "--folder", folder, "--write-clean", tmp_path / "good.txt", "--workers", 2)
    assert rc == 1 and f"{len(real_images) + 2} samples, 2 bad" in out
    assert f"{next(folder.rglob('truncated.jpg'))}: does not decode: no end-of-image marker" in out
    assert f"{next(folder.rglob('not_an_image.jpg'))}: does not decode: not a JPEG or PNG" in out
    listed = (tmp_path / "good.txt").read_text().splitlines()
    assert sorted(Path(p).stem for p in listed) == sorted(real_images) and all(os.path.isabs(p) for p in listed)
    rc, out, _ = _run(capsys, "verify", "--list", tmp_path / "good.txt")
    assert rc == 0 and f"{len(real_images)} samples, 0 bad" in out


# --- stats and vocab -----------------------------------------------------------------------------
def test_stats_folder_and_shards(tmp_path, capsys, folder, real_images):
    rc, out, _ = _run(capsys, "stats", "--folder", folder)
    assert rc == 0
    n = len(real_images)
    shapes = [decode_reference(d).shape for d in real_images.values()]
    hs, ws = [s[0] for s in shapes], [s[1] for s in shapes]
    assert f"folder {folder}: {n + 2} samples" in out
    assert f"height min/median/max {min(hs)}/{int(np.median(hs))}/{max(hs)}" in out
    assert f"width min/median/max {min(ws)}/{int(np.median(ws))}/{max(ws)}" in out
    assert "png 1" in out and "progressive 1" in out and "grey 1" in out and "bad headers 2" in out
    per_class = [sum(1 for i, _ in enumerate(sorted({**real_images, "truncated": 0, "not_an_image": 0})) if i % 2 == c)
                 for c in (0, 1)]
    assert f"  class_0                  {per_class[0]}" in out and f"  class_1                  {per_class[1]}" in out

    assert _run(capsys, "shards", "--folder", folder, "--out", tmp_path / "s", "--max-bad", 2)[0] == 0
    rc, out, _ = _run(capsys, "stats", "--shards", tmp_path / "s")
    assert rc == 0 and f"shards {tmp_path / 's'}: {n} samples" in out
    assert f"height min/median/max {min(hs)}/" in out and "png" not in out and "bad headers 0" in out


def test_stats_list_with_tags(tmp_path, capsys, real_images):
    tags = [["cat", "sky"], ["dog"], ["cat"], []]
    lst, jsonl = _tagged_list(tmp_path / "in", real_images["flower_odd"], tags)
    rc, out, _ = _run(capsys, "stats", "--list", lst, "--tags", jsonl)
    assert rc == 0 and "4 samples" in out
    assert "tags: 3 in the vocabulary, 3 used; 1.00 tags per image on average, 1 untagged" in out
    assert "  cat                      2" in out and "height min/median/max 53/53/53" in out


@needs_fmnist
def test_stats_fmnist_keeps_its_output(capsys):
    rc, out, _ = _run(capsys, "stats", "--fmnist", "--num", 500, "--seed", 1)
    assert rc == 0
    lines = out.splitlines()
    assert lines[0] == "train: 60000 images of (28, 28) uint8; per class [" + ", ".join(["6000"] * 10) + "]"
    assert lines[1].startswith("test: 10000 images") and lines[2].startswith("weak hashtags: 500 mosaics, ")
    assert [ln.split()[0] for ln in lines[3:]] == list(fmnist.VOCAB)


def test_vocab_command(tmp_path, capsys):
    jsonl = tmp_path / "t.jsonl"
    rows = [{"file": "a", "tags": ["x", "y"]}, {"file": "b", "tags": ["y"]}, {}, {"file": "c", "tags": ["z", "y"]}]
    jsonl.write_text("".join((json.dumps(r) if r else "") + "\n" for r in rows))  # with a blank line
    rc, out, _ = _run(capsys, "vocab", "--tags", jsonl, "--out", tmp_path / "v" / "vocab.json", "--min-count", 1)
    v = Vocab.load(tmp_path / "v" / "vocab.json")
    assert rc == 0 and v.tags == ["y", "x", "z"] and v.counts == [3, 1, 1] and "3 tags" in out
    assert _run(capsys, "vocab", "--tags", jsonl, "--out", tmp_path / "v2.json", "--min-count", 2)[0] == 0
    assert Vocab.load(tmp_path / "v2.json").tags == ["y"]
    (tmp_path / "ids.jsonl").write_text('{"file": "a", "tags": [1, 2]}\n')
    rc, _, err = _run(capsys, "vocab", "--tags", tmp_path / "ids.jsonl", "--out", tmp_path / "v3.json")
    assert rc == 2 and "holds tag ids, not tag strings" in err and not (tmp_path / "v3.json").exists()


def test_vocab_min_count_and_max_size_say_what_they_keep(tmp_path, capsys):
    """The vocabulary rule (a minimum count, then the most frequent up to a size) and its effect: how many
    distinct tags, images and tag occurrences the vocabulary keeps, counted by hand here."""
    jsonl = tmp_path / "t.jsonl"
    # counts: a 4, b 3, c 2, d 1, e 1; the last image has only rare tags
    rows = [["a", "b"], ["a", "b", "c"], ["a", "c"], ["a", "b", "a"], ["d", "e"]]
    jsonl.write_text("".join(json.dumps({"file": f"{i}.jpg", "tags": t}) + "\n" for i, t in enumerate(rows)))
    rc, out, _ = _run(capsys, "vocab", "--tags", jsonl, "--out", tmp_path / "v.json", "--min-count", 2)
    assert rc == 0 and Vocab.load(tmp_path / "v.json").tags == ["a", "b", "c"]
    assert "vocabulary of 3 tags (seen on >= 2 images; least frequent kept: 2 images)" in out
    assert "3 of 5 distinct tags kept; 4 of 5 images (80.00%) keep at least one tag, 1 keep none; " \
           "9 of 11 tag occurrences (81.82%)" in out
    rc, out, _ = _run(capsys, "vocab", "--tags", jsonl, "--out", tmp_path / "v2.json", "--max-size", 2)
    assert rc == 0 and Vocab.load(tmp_path / "v2.json").tags == ["a", "b"]
    assert "the 2 most frequent" in out and "2 of 5 distinct tags kept; 4 of 5 images" in out
    rc, _, err = _run(capsys, "vocab", "--tags", jsonl, "--out", tmp_path / "v3.json", "--max-size", 0)
    assert rc == 2 and "--max-size must be >= 1" in err and not (tmp_path / "v3.json").exists()


# --- user errors ---------------------------------------------------------------------------------
def _setup_errors(tmp_path: Path, real_images) -> None:
    (tmp_path / "empty").mkdir()
    (tmp_path / "flat").mkdir()
    (tmp_path / "flat" / "a.jpg").write_bytes(real_images["china"])
    (tmp_path / "list.txt").write_text("a.jpg\n")
    (tmp_path / "tags.jsonl").write_text('{"file": "a.jpg", "tags": ["x"]}\n')


@pytest.mark.parametrize("argv, culprit", [
    (["shards", "--folder", "{t}/nope", "--out", "{t}/o"], "{t}/nope"),
    (["shards", "--folder", "{t}/empty", "--out", "{t}/o"], "{t}/empty"),
    (["shards", "--folder", "{t}/flat", "--out", "{t}/o"], "{t}/flat"),
    (["shards", "--list", "{t}/list.txt", "--tags", "{t}/tags.jsonl", "--vocab", "{t}/v.json", "--out", "{t}/o"],
     "{t}/v.json"),
    (["shards", "--list", "{t}/nope.txt", "--out", "{t}/o"], "{t}/nope.txt"),
    (["shards", "--list", "{t}/list.txt", "--tags", "{t}/nope.jsonl", "--out", "{t}/o"], "{t}/nope.jsonl"),
    (["verify", "--shards", "{t}/nope"], "{t}/nope"),
    (["verify", "--folder", "{t}/empty"], "{t}/empty"),
    (["verify", "--list", "{t}/nope.txt"], "{t}/nope.txt"),
    (["stats", "--folder", "{t}/flat"], "{t}/flat"),
    (["stats", "--shards", "{t}/empty"], "{t}/empty"),
    (["vocab", "--tags", "{t}/nope.jsonl", "--out", "{t}/v.json"], "{t}/nope.jsonl"),
])
def test_user_errors_are_one_line_naming_the_path(tmp_path, capsys, real_images, argv, culprit):
    _setup_errors(tmp_path, real_images)
    rc, _, err = _run(capsys, *[a.format(t=tmp_path) for a in argv])
    assert rc == 2 and err.count("\n") == 1 and err.startswith("maws-data: error: "), err
    assert culprit.format(t=tmp_path) in err and "Traceback" not in err
    assert not (tmp_path / "o" / "manifest.json").exists()
