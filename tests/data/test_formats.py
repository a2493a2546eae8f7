"""The data formats under maws-data: the image header check, the shard format, vocabularies and tags."""

from __future__ import annotations

import re
import subprocess
import sys
import tarfile
from pathlib import Path

import numpy as np
import pytest
import torch

from maws_fast.data.images import decode_pil, encode_jpeg, inspect_image
from maws_fast.data.shards import ShardReader, ShardWriter, open_shards, read_index
from maws_fast.data.sources import Vocab, build_vocab, pad_tags, read_file_list, resample_indices
from maws_fast.errors import DataError
from tests.data.photos import decode_reference


WDS2IDX = Path(sys.executable).with_name("wds2idx")


# --- images --------------------------------------------------------------------------------------
def test_inspect_matches_pil_on_every_real_image(real_images):
    for name, data in real_images.items():
        info = inspect_image(data)
        ref = decode_reference(data)
        assert info.ok, (name, info.problem)
        assert (info.height, info.width) == ref.shape[:2], name
        assert info.format == ("png" if name.endswith("_png") else "jpeg"), name
        assert info.channels == (1 if name == "flower_gray" else 3), name
        assert info.progressive == (name == "flower_progressive"), name
        # The numpy-array form of the bytes gives the same answer.
        assert inspect_image(np.frombuffer(data, np.uint8)) == info


def test_decode_pil_matches_reference_and_modes(real_images):
    for name, data in real_images.items():
        rgb = decode_pil(data, "RGB")
        assert rgb.dtype == np.uint8 and np.array_equal(rgb, decode_reference(data)), name
    grey = decode_pil(real_images["flower_gray"], "L")
    assert grey.ndim == 2 and grey.shape == decode_pil(real_images["flower_gray"]).shape[:2]


def _broken(real_images, broken_images) -> dict[str, bytes]:
    jpg, png = real_images["china"], real_images["astronaut_png"]
    sos = jpg.index(b"\xff\xda")  # start of scan: everything before it is headers
    return {**broken_images, "empty": b"", "cut_in_headers": jpg[: sos - 20], "png_cut": png[: len(png) // 2],
            "jpeg_magic_only": jpg[:3]}


def test_broken_bytes_are_not_ok_and_say_why(real_images, broken_images):
    broken = _broken(real_images, broken_images)
    for name, data in broken.items():
        info = inspect_image(data)
        assert not info.ok and info.problem, name
        with pytest.raises(ValueError):
            decode_pil(data)
    assert "truncated" in inspect_image(broken["truncated"]).problem
    assert "truncated" in inspect_image(broken["cut_in_headers"]).problem
    assert "truncated" in inspect_image(broken["png_cut"]).problem
    assert "not a JPEG or PNG" in inspect_image(broken["not_an_image"]).problem
    assert inspect_image(b"").problem == "empty file"


def test_encode_jpeg_round_trip(real_images):
    rgb = decode_pil(real_images["flower_odd"])
    back = decode_pil(encode_jpeg(rgb, quality=95))
    assert back.shape == rgb.shape and np.abs(back.astype(int) - rgb).mean() < 4
    grey = decode_pil(real_images["flower_gray"], "L")
    enc = encode_jpeg(grey, quality=95, progressive=True)
    info = inspect_image(enc)
    assert info.channels == 1 and info.progressive and (info.height, info.width) == grey.shape


# --- shards --------------------------------------------------------------------------------------
def _write_shards(out: Path, real_images, per_shard: int = 2) -> list[tuple[str, bytes, dict]]:
    w = ShardWriter(out, per_shard)
    rows = []
    for k, (name, data) in enumerate(sorted(real_images.items())):
        meta = {"tags": [k, k + 1], "label": k % 3, "src": name}
        w.write(f"{k:09d}", data, meta)
        rows.append((f"{k:09d}", data, meta))
    w.finish(classes=["a", "b", "c"])
    return rows


def test_shard_round_trip(tmp_path, real_images):
    rows = _write_shards(tmp_path / "s", real_images, per_shard=3)
    shards = open_shards(tmp_path / "s")
    assert len(shards) == len(rows) and len(shards.tars) == -(-len(rows) // 3)
    assert shards.manifest["classes"] == ["a", "b", "c"] and shards.manifest["num_samples"] == len(rows)
    assert not list((tmp_path / "s").glob("*.tmp"))
    reader = ShardReader()
    for s, (key, data, meta) in zip(shards.samples, rows):
        assert s.key == key
        assert reader.read(s) == (data, meta)
    reader.close()
    # The index offsets are where tarfile finds the member data.
    for tar_path in shards.tars:
        with tarfile.open(tar_path) as tar:
            members = {m.name: m for m in tar}
        for s in (s for s in shards.samples if s.tar == tar_path):
            assert members[f"{s.key}.jpg"].offset_data == s.jpg_offset
            assert members[f"{s.key}.json"].offset_data == s.json_offset
            assert members[f"{s.key}.jpg"].size == s.jpg_size
    # Without the manifest the tars are found by globbing, with the same samples.
    (tmp_path / "s" / "manifest.json").unlink()
    assert open_shards(tmp_path / "s").samples == shards.samples


def test_shard_writer_refuses_finished_dir_and_bad_size(tmp_path, real_images):
    _write_shards(tmp_path / "s", real_images)
    with pytest.raises(DataError, match="already holds shards"):
        ShardWriter(tmp_path / "s", 2)
    with pytest.raises(DataError, match=">= 1"):
        ShardWriter(tmp_path / "t", 0)


@pytest.mark.skipif(not WDS2IDX.exists(), reason="DALI's wds2idx is not installed")
def test_index_matches_dalis_wds2idx(tmp_path, real_images):
    _write_shards(tmp_path / "s", real_images, per_shard=4)
    shards = open_shards(tmp_path / "s")
    for tar, idx in zip(shards.tars, shards.indexes):
        theirs = tmp_path / (Path(tar).stem + ".dali.idx")
        subprocess.run([str(WDS2IDX), tar, str(theirs)], check=True, capture_output=True)
        assert read_index(theirs, tar) == read_index(idx, tar)
        assert theirs.read_text().split() == Path(idx).read_text().split()


def test_index_errors_name_the_file(tmp_path, real_images):
    _write_shards(tmp_path / "s", real_images)
    s = tmp_path / "s"
    idx = s / "shard-000001.idx"
    good = idx.read_text()
    idx.write_text("v1.1 2\n" + good.split("\n", 1)[1])
    with pytest.raises(DataError, match=f"{re.escape(str(idx))} is not a v1.2 DALI index"):
        open_shards(s)
    lines = good.splitlines()
    idx.write_text(f"{lines[0]}\n{lines[1]}\njpg 0 10 x.jpg\n")
    with pytest.raises(DataError, match=re.escape(f"{idx}:3: a sample needs a .jpg and a .json member")):
        read_index(idx, s / "shard-000001.tar")
    idx.unlink()
    with pytest.raises(DataError, match=f"has no DALI index {re.escape(str(idx))}.*wds2idx"):
        open_shards(s)
    with pytest.raises(DataError, match="does not exist"):
        open_shards(tmp_path / "nope")
    (tmp_path / "empty").mkdir()
    with pytest.raises(DataError, match="holds no .tar shards; pass the directory `maws-data shards --out DIR` wrote"):
        open_shards(tmp_path / "empty")


def test_an_image_folder_where_shards_are_expected_names_data_format_folder(tmp_path):
    """ImageNet's train/ given as shards: the error says how to read it as it is, and never suggests
    writing shards into the source dataset."""
    (tmp_path / "in1k" / "n01440764").mkdir(parents=True)
    (tmp_path / "in1k" / "n01440764" / "a.JPEG").write_bytes(b"\xff\xd8")
    with pytest.raises(DataError, match="looks like an image folder .*--data.format=folder") as e:
        open_shards(tmp_path / "in1k")
    assert f"--out {tmp_path / 'in1k'}" not in str(e.value) and "--out DIR" in str(e.value)
    with pytest.raises(DataError) as e:
        open_shards(tmp_path / "nope")
    assert "--out DIR" in str(e.value) and f"--out {tmp_path / 'nope'}" not in str(e.value)


def test_reader_names_a_truncated_tar(tmp_path, real_images):
    _write_shards(tmp_path / "s", real_images)
    shards = open_shards(tmp_path / "s")
    last = shards.samples[-1]
    with open(last.tar, "r+b") as f:
        f.truncate(last.jpg_offset + 10)
    with pytest.raises(DataError, match=f"{last.key}: the tar is shorter than its index says"):
        ShardReader().read(last)


# --- vocabulary and tags -------------------------------------------------------------------------
def test_vocab_save_load_and_errors(tmp_path):
    v = Vocab(["cat", "dog", "sky"], [5, 3, 1])
    v.save(tmp_path / "v.json")
    back = Vocab.load(tmp_path / "v.json")
    assert back.tags == v.tags and back.counts == v.counts and back.id("dog") == 1 and back.id("cow") is None
    with pytest.raises(DataError, match=f"{re.escape(str(tmp_path / 'nope.json'))} does not exist.*maws-data vocab"):
        Vocab.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text('{"tag": []}')
    with pytest.raises(DataError, match="bad.json is not a hashtag vocabulary"):
        Vocab.load(tmp_path / "bad.json")
    with pytest.raises(DataError, match="repeats tags"):
        Vocab(["a", "a"], [1, 1])
    with pytest.raises(DataError, match="2 tags but 1 counts"):
        Vocab(["a", "b"], [1])


def test_build_vocab_orders_by_count_then_name():
    v = build_vocab([["sky", "cat", "cat"], ["dog", "cat"], ["dog", "ant"], ["sky"]])
    # Duplicates inside one image count once.
    assert v.tags == ["cat", "dog", "sky", "ant"] and v.counts == [2, 2, 2, 1]
    assert build_vocab([["a"], ["a", "b"]], min_count=2).tags == ["a"]
    with pytest.raises(DataError, match="at least 3 times"):
        build_vocab([["a"]], min_count=3)


def test_read_file_list_with_int_and_string_tags(tmp_path):
    (tmp_path / "list.txt").write_text("# images\na.jpg\nsub/b.jpg\n\nc.jpg\n")
    (tmp_path / "ids.jsonl").write_text('{"file": "a.jpg", "tags": [3, 1, 3]}\n{"file": "c.jpg", "tags": []}\n'
                                        '{"file": "other.jpg", "tags": [9]}\n')
    src = read_file_list(tmp_path / "list.txt", tmp_path / "ids.jsonl", None)
    assert src.paths == [str(tmp_path / p) for p in ("a.jpg", "sub/b.jpg", "c.jpg")]
    assert src.tags == [[1, 3], [], []]
    (tmp_path / "str.jsonl").write_text('{"file": "sub/b.jpg", "tags": ["dog", "cow", "cat"]}\n')
    vocab = Vocab(["cat", "dog"], [2, 1])
    assert read_file_list(tmp_path / "list.txt", tmp_path / "str.jsonl", vocab).tags == [[], [0, 1], []]
    with pytest.raises(DataError, match="string hashtags but no vocabulary"):
        read_file_list(tmp_path / "list.txt", tmp_path / "str.jsonl", None)
    (tmp_path / "bad.jsonl").write_text('{"file": "a.jpg", "tags": [1]}\nnot json\n')
    with pytest.raises(DataError, match="bad.jsonl:2"):
        read_file_list(tmp_path / "list.txt", tmp_path / "bad.jsonl", None)
    with pytest.raises(DataError, match="nope.txt does not exist"):
        read_file_list(tmp_path / "nope.txt", None, None)
    (tmp_path / "empty.txt").write_text("# nothing\n")
    with pytest.raises(DataError, match="lists no images"):
        read_file_list(tmp_path / "empty.txt", None, None)


def test_pad_tags_shapes_and_weights():
    ids, w = pad_tags([[4, 2, 7], [1], []])
    assert ids.shape == w.shape == (3, 3) and ids.dtype == torch.int64 and w.dtype == torch.float32
    assert ids.tolist() == [[4, 2, 7], [1, -1, -1], [-1, -1, -1]]
    assert torch.allclose(w, torch.tensor([[1 / 3] * 3, [1, 0, 0], [0, 0, 0]]))
    ids, w = pad_tags([[4, 2, 7], [1]], max_tags=2)
    assert ids.tolist() == [[4, 2], [1, -1]] and torch.allclose(w.sum(1), torch.ones(2))
    assert pad_tags([[], []])[0].shape == (2, 1)


def test_resample_indices_deterministic_and_weighted():
    tags = [[0]] * 90 + [[1]] * 10 + [[]] * 5
    counts = [90, 10]
    a = resample_indices(tags, counts, 2000, seed=3)
    assert np.array_equal(a, resample_indices(tags, counts, 2000, seed=3))
    assert not np.array_equal(a, resample_indices(tags, counts, 2000, seed=4))
    assert a.shape == (2000,) and np.all(np.diff(a) >= 0)
    assert not np.any(a >= 100)  # tagless samples weigh 0
    # Inverse-sqrt: tag 1 is drawn in proportion 10 * 10**-0.5 : 90 * 90**-0.5 = 1 : 3, not 1 : 9.
    rare = np.mean(a >= 90)
    assert 0.2 < rare < 0.3
    with pytest.raises(DataError, match="none has tags"):
        resample_indices([[], []], [1], 5, seed=0)
