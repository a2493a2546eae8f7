"""make_captions: captions written from the noisy weak hashtags, so they carry the same noise."""
import pytest
import torch

from maws_fast.data.fmnist import (CAPTION_NOUNS, CAPTION_SUPER_WORDS, CAPTION_TEMPLATES, VOCAB,
                                   make_captions, make_weak_hashtags)
from maws_fast.errors import DataError


def _tags(*names):
    t = torch.zeros(1, len(VOCAB))
    for n in names:
        t[0, VOCAB.index(n)] = 1
    return t


def test_names_exactly_the_tags():
    caps = make_captions(torch.cat([_tags("sneaker", "bag", "footwear"), _tags("coat"), _tags("top")]), seed=0)
    first = caps[0]
    assert ("a sneaker and a bag" in first or "a bag and a sneaker" in first) and first.count("footwear") == 1
    assert "coat" not in first and "a top" not in first
    assert "a coat" in caps[1] and "sneaker" not in caps[1]
    assert "a top" in caps[2]  # only a super-tag: captioned by it alone
    for c in caps:
        assert any(c == t.format(c[len(t.split("{}")[0]):len(c) - len(t.split("{}")[1])]) for t in CAPTION_TEMPLATES)


def test_carries_the_tags_noise_and_is_seeded():
    images = torch.randint(0, 256, (50, 28, 28), dtype=torch.uint8)
    labels = torch.randint(0, 10, (50,))
    _, tags = make_weak_hashtags(images, labels, num=200, seed=3)
    caps = make_captions(tags, seed=7)
    assert caps == make_captions(tags, seed=7) and caps != make_captions(tags, seed=8)
    words = CAPTION_NOUNS + CAPTION_SUPER_WORDS  # none is a substring of another
    assert not any(a != b and a in b for a in words for b in words)
    for row, cap in zip(tags, caps):  # every tag is said, nothing else
        for j, word in enumerate(words):
            assert (word in cap) == bool(row[j]), (cap, [VOCAB[k] for k in row.nonzero().flatten()])
    assert len(set(caps)) > 50


def test_errors():
    with pytest.raises(DataError, match="multi-hot tags"):
        make_captions(torch.zeros(3, 5), seed=0)
    with pytest.raises(DataError, match="row 1 has no tag"):
        make_captions(torch.cat([_tags("bag"), torch.zeros(1, len(VOCAB))]), seed=0)
