"""The caption tokenizer (HF tokenizers' byte-level BPE) and caption files."""
import json

import pytest
import torch

from maws_fast.data import fmnist
from maws_fast.data.text import CaptionTokenizer, read_captions
from maws_fast.errors import ConfigError, DataError


def _corpus(n=400, seed=0):
    g = torch.Generator().manual_seed(seed)
    tags = (torch.rand(n, len(fmnist.VOCAB), generator=g) < 0.2).float()
    tags[:, 0] = 1  # no empty row
    return fmnist.make_captions(tags, seed)


def test_training_is_deterministic_and_the_layout_is_cls_tokens_eos_pad(tmp_path):
    caps = _corpus()
    a, b = CaptionTokenizer.train(caps, 400, 48), CaptionTokenizer.train(caps, 400, 48)
    assert a.to_str() == b.to_str()  # the same file, byte for byte
    ids = a.encode(caps[:5] + ["Sneaker"])
    assert ids.shape == (6, 48) and ids.dtype == torch.int64
    for row, cap in zip(ids, caps[:5] + ["sneaker"]):
        n = int((row != 0).sum())
        assert row[0] == 1 and row[n - 1] == 2 and (row[n:] == 0).all()
        assert a.decode(row.tolist()).strip() == cap.lower()  # lower-cased, nothing lost
    # a caption longer than the context keeps [CLS] and [EOS]
    long = a.encode([" ".join(["sneaker"] * 50)])[0]
    assert long[0] == 1 and long[-1] == 2 and (long != 0).all()
    # bytes never seen in training still encode (byte level: no unknown token)
    odd = a.encode(["ünïcödé ☃"])[0]
    assert a.decode(odd.tolist()).strip() == "ünïcödé ☃"
    a.save(tmp_path / "tokenizer.json")
    c = CaptionTokenizer.load(tmp_path / "tokenizer.json")
    assert c.context_length == 48 and c.vocab_size == a.vocab_size
    torch.testing.assert_close(c.encode(caps[:7]), a.encode(caps[:7]))


def test_tokenizer_errors(tmp_path):
    with pytest.raises(ConfigError, match="lit.vocab_size"):
        CaptionTokenizer.train(["a b"], 100, 10)
    with pytest.raises(ConfigError, match="lit.context_length"):
        CaptionTokenizer.train(["a b"], 300, 2)
    with pytest.raises(DataError, match="no captions"):
        CaptionTokenizer.train([], 300, 10)
    with pytest.raises(DataError, match="does not exist"):
        CaptionTokenizer.load(tmp_path / "nope.json")
    (tmp_path / "bad.json").write_text("{not json")
    with pytest.raises(DataError, match="does not load"):
        CaptionTokenizer.load(tmp_path / "bad.json")
    from tokenizers import Tokenizer, models  # a valid file, but not one of ours (no specials, no padding)

    Tokenizer(models.BPE()).save(str(tmp_path / "other.json"))
    with pytest.raises(DataError, match="not written by maws_fast"):
        CaptionTokenizer.load(tmp_path / "other.json")
    tok = CaptionTokenizer.train(_corpus(50), 300, 10)
    with pytest.raises(TypeError, match="list of captions"):
        tok.encode("a sneaker")


def test_read_captions(tmp_path):
    (tmp_path / "c.txt").write_text("a sneaker\n\na bag\n")
    assert read_captions(tmp_path / "c.txt") == ["a sneaker", "a bag"]
    (tmp_path / "c.jsonl").write_text(json.dumps({"file": "x.jpg", "caption": "a coat"}) + "\n")
    assert read_captions(tmp_path / "c.jsonl") == ["a coat"]
    (tmp_path / "bad.jsonl").write_text('{"file": "x.jpg"}\n')
    with pytest.raises(DataError, match="bad.jsonl:1"):
        read_captions(tmp_path / "bad.jsonl")
    (tmp_path / "num.jsonl").write_text('{"caption": 3}\n')
    with pytest.raises(DataError, match="not a string"):
        read_captions(tmp_path / "num.jsonl")
    with pytest.raises(DataError, match="does not exist"):
        read_captions(tmp_path / "none.txt")


def test_special_token_text_in_a_caption_is_text_and_foreign_layouts_are_refused(tmp_path):
    tok = CaptionTokenizer.train(_corpus(50), 300, 16)
    ids = tok.encode(["a shirt [PAD] a bag [EOS] [CLS]"])[0]
    n = int((ids != 0).sum())
    assert ids[0] == 1 and ids[n - 1] == 2 and (ids[1:n - 1] > 2).all()  # only the real specials are 0 / 1 / 2
    again = CaptionTokenizer.load(_saved(tok, tmp_path / "t.json"))
    assert torch.equal(again.encode(["a [PAD] b"]), tok.encode(["a [PAD] b"]))
    raw = tok.tok
    raw.no_padding()
    raw.enable_padding(pad_id=0, pad_token="[PAD]")  # pads to the batch's longest, not to the context
    raw.save(str(tmp_path / "loose.json"))
    with pytest.raises(DataError, match="not written by maws_fast"):
        CaptionTokenizer.load(tmp_path / "loose.json")


def _saved(tok, path):
    tok.save(path)
    return path
