"""The Loader protocol (maws_fast.data.loader): what the training loop may call on every loader."""
import torch

from maws_fast.data.loader import Loader
from maws_fast.data.reference import BatchLoader


def test_reference_loader_implements_the_protocol_without_state():
    images = torch.randint(0, 256, (10, 8, 8), dtype=torch.uint8)
    loader = BatchLoader(images, None, 4, seed=0, mean=0.5, std=0.25)
    assert isinstance(loader, Loader)
    # (epoch, batch) alone say where it is: no reader state, no bad samples, nothing to release
    assert loader.state_dict() is None and loader.bad is None
    loader.load_state_dict({})
    loader.close()
    first = [x for x, _ in loader.epoch(0)]
    assert len(first) == loader.num_batches == 2 and first[0].shape == (4, 1, 8, 8)
