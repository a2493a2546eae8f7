"""Tests for maws_fast.eval.features.extract_features."""

import pytest
import torch
from torch import nn

from maws_fast.errors import ConfigError
from maws_fast.eval.features import extract_features


class TinyPooled(nn.Module):
    """Conv + mean pool with dropout, so train vs eval mode changes the output."""

    def __init__(self) -> None:
        super().__init__()
        self.conv = nn.Conv2d(3, 8, 3, padding=1)
        self.drop = nn.Dropout(0.5)
        self.modes_seen: list[bool] = []

    def forward_pooled(self, imgs: torch.Tensor) -> torch.Tensor:
        self.modes_seen.append(self.training)
        return self.drop(self.conv(imgs)).mean(dim=(2, 3)).double()  # (B, 8)


def _batches(n_batches: int = 3, b: int = 4) -> list[tuple[torch.Tensor, torch.Tensor]]:
    g = torch.Generator().manual_seed(0)
    return [(torch.randn(b, 3, 8, 8, generator=g), torch.zeros(b)) for _ in range(n_batches)]


@pytest.mark.parametrize("start_training", [True, False])
def test_matches_direct_forward_and_restores_mode(start_training: bool) -> None:
    torch.manual_seed(0)
    model = TinyPooled().train(start_training)
    batches = _batches()
    feats = extract_features(model, batches)
    assert model.training is start_training
    assert all(not m for m in model.modes_seen)  # every forward ran in eval mode
    assert feats.shape == (12, 8) and feats.dtype == torch.float32 and feats.device.type == "cpu"
    assert not feats.is_inference() and not feats.requires_grad
    model.eval()
    with torch.no_grad():
        expected = torch.cat([model.forward_pooled(x) for x, _ in batches]).float()
    torch.testing.assert_close(feats, expected)


def test_restores_mode_on_error() -> None:
    model = TinyPooled().train()

    def bad_batches():
        yield torch.randn(2, 3, 8, 8), None
        raise RuntimeError("loader died")

    with pytest.raises(RuntimeError, match="loader died"):
        extract_features(model, bad_batches())
    assert model.training


def test_features_usable_for_training() -> None:
    feats = extract_features(TinyPooled(), _batches())
    head = nn.Linear(8, 2)
    head(feats).sum().backward()  # would fail on an inference tensor saved for backward
    assert head.weight.grad is not None


def test_empty_batches_raise() -> None:
    with pytest.raises(ConfigError, match="no batches"):
        extract_features(TinyPooled(), [])
