"""Mixup / CutMix + label smoothing: timm's Mixup numbers from the same seed, targets that sum to 1,
CutMix's lam equal to the area it pasted, the input left alone."""
import numpy as np
import pytest
import torch

from maws_fast.train.mixup import Mixup, smooth_one_hot


def test_smoothing_values_and_rows_sum_to_one():
    t = smooth_one_hot(torch.tensor([2, 0]), 5, 0.1)
    assert t[0, 2].item() == pytest.approx(0.92) and t[0, 0].item() == pytest.approx(0.02)
    torch.testing.assert_close(t.sum(1), torch.ones(2))
    assert torch.equal(smooth_one_hot(torch.tensor([1]), 3), torch.tensor([[0.0, 1.0, 0.0]]))


@pytest.mark.parametrize("seed", range(6))
def test_matches_timm_mixup_from_the_same_seed(seed):
    timm_mixup = pytest.importorskip("timm.data.mixup")
    x = torch.randn(6, 3, 20, 24)
    y = torch.randint(0, 10, (6,))
    ours = Mixup(num_classes=10)  # the official fine-tune's: 0.8 / 1.0, prob 1, switch 0.5, smoothing 0.1
    got_x, got_t = ours(x, y, np.random.RandomState(seed))
    ref = timm_mixup.Mixup(mixup_alpha=0.8, cutmix_alpha=1.0, prob=1.0, switch_prob=0.5, mode="batch",
                           label_smoothing=0.1, num_classes=10)
    np.random.seed(seed)
    want_x = x.clone()
    out = ref(want_x, y)  # mixes want_x in place; timm >= 1.0 returns (images, targets)
    want_t = out[1] if isinstance(out, tuple) else out
    torch.testing.assert_close(got_x, want_x, rtol=0, atol=0)
    torch.testing.assert_close(got_t, want_t, rtol=0, atol=1e-7)


def test_targets_sum_to_one_and_cutmix_lam_is_the_pasted_area():
    mix = Mixup(num_classes=4, mixup_alpha=0.0, cutmix_alpha=1.0)  # CutMix only, smoothing 0.1
    boxes = 0
    for s in range(20):
        x = torch.zeros(4, 1, 16, 16)
        x[:2] = 1.0  # images 2 and 3 are 0: the box image 0 got from image 3 shows as its zeros
        y = torch.tensor([0, 1, 2, 3])
        before = x.clone()
        out, t = mix(x, y, np.random.RandomState(s))
        assert torch.equal(x, before)  # the input is not modified
        torch.testing.assert_close(t.sum(1), torch.ones(4))
        lam = 1.0 - (out[0] == 0).float().mean().item()
        boxes += lam < 1.0
        torch.testing.assert_close(t[0], torch.tensor([lam, 0, 0, 1 - lam]) * 0.9 + 0.025, rtol=0, atol=1e-6)
    assert boxes >= 15  # boxes were pasted (a lam near 1 can round the box away)


def test_mixup_blends_with_the_reversed_batch_and_prob_zero_only_smooths(seeded):
    x, y = torch.randn(3, 1, 4, 4), torch.tensor([0, 1, 2])
    out, t = Mixup(num_classes=3, cutmix_alpha=0.0, label_smoothing=0.0)(x, y, np.random.RandomState(1))
    lam = t[0, 0].item()
    torch.testing.assert_close(out, lam * x + (1 - lam) * x.flip(0))
    torch.testing.assert_close(out[1], x[1])  # the middle image pairs with itself
    assert t[1, 1].item() == pytest.approx(1.0)
    out, t = Mixup(num_classes=3, prob=0.0)(x, y, np.random.RandomState(1))
    assert out is x and torch.equal(t, smooth_one_hot(y, 3, 0.1))
