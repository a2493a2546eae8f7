"""Zero-shot classification: the prompt-ensemble classifier and top-k, against hand computations."""
import pytest
import torch
import torch.nn.functional as F

from maws_fast.eval.zeroshot import DEFAULT_TEMPLATES, class_embeddings, zero_shot_accuracy


def _encoder(dim=8):
    """A stand-in text tower: a fixed random vector per prompt string (and the calls it got)."""
    calls, table = [], {}

    def encode(prompts):
        calls.append(list(prompts))
        for p in prompts:
            table.setdefault(p, torch.randn(dim, generator=torch.Generator().manual_seed(hash(p) % 2**31)) * 3)
        return torch.stack([table[p] for p in prompts])

    return encode, calls, table


def test_class_vectors_are_renormalised_means_of_normalised_prompts():
    encode, calls, table = _encoder()
    names, templates = ["sneaker", "bag", "coat"], ["a photo of a {}.", "a {} on a shelf", "{}"]
    w = class_embeddings(encode, names, templates, batch_size=4)
    assert w.shape == (3, 8) and sum(len(c) for c in calls) == 9 and max(len(c) for c in calls) == 4
    for i, n in enumerate(names):
        want = F.normalize(torch.stack([F.normalize(table[t.format(n)], dim=0) for t in templates]).mean(0), dim=0)
        assert torch.allclose(w[i], want, atol=1e-6)
    assert torch.allclose(w.norm(dim=1), torch.ones(3), atol=1e-6)


def test_top_k():
    classes = torch.eye(4)
    feats = torch.tensor([[5.0, 1, 0, 0], [0, 2, 3, 0], [1, 0, 0, 0.5], [0, 0, 1, 2]])
    labels = torch.tensor([0, 1, 3, 2])  # right, second, second, second
    acc = zero_shot_accuracy(feats, labels, classes, ks=(1, 2, 5))
    assert acc == {"top1": 0.25, "top2": 1.0, "top5": 1.0}


def test_end_to_end_on_separable_data():
    """Images drawn near their class's text vector are classified by it, whatever the templates."""
    encode, _, _ = _encoder(16)
    names = [f"class {i}" for i in range(6)]
    w = class_embeddings(encode, names)
    labels = torch.arange(6).repeat(5)
    imgs = w[labels] * 4 + 0.05 * torch.randn(30, 16)
    assert zero_shot_accuracy(imgs, labels, w)["top1"] == 1.0
    assert len(DEFAULT_TEMPLATES) > 1 and all(t.count("{}") == 1 for t in DEFAULT_TEMPLATES)


def test_errors():
    encode, _, _ = _encoder()
    with pytest.raises(ValueError, match="exactly one"):
        class_embeddings(encode, ["a"], ["no slot"])
    with pytest.raises(ValueError, match="no class names"):
        class_embeddings(encode, [])
    with pytest.raises(ValueError, match="returned 1 rows"):
        class_embeddings(lambda p: torch.zeros(1, 8), ["a", "b"], ["{}"])
    with pytest.raises(ValueError, match="shared width"):
        zero_shot_accuracy(torch.zeros(2, 4), torch.zeros(2, dtype=torch.long), torch.zeros(3, 8))
