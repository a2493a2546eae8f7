"""Test setup shared by every test.

* ``TRITON_INTERPRET=1`` is set BEFORE any kernel module is imported, so Triton kernels run on
  CPU tensors under the interpreter.
* A torchvision shim (CPU torch only): the torchvision wheel on the package index is built for a
  CUDA torch and fails to import beside CPU torch 2.13 with "operator torchvision::nms does not
  exist". timm (the ViT parity reference) imports torchvision, so when that exact failure happens
  we define the ``nms`` / ``qnms`` schemas and import again. Nothing is patched on CUDA builds.
"""
import os
import sys

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

_TORCHVISION_LIB = None  # keeps the shim's schema definitions alive for the session


def _import_torchvision_with_shim() -> None:
    global _TORCHVISION_LIB
    if torch.version.cuda is not None:
        return
    try:
        import torchvision  # noqa: F401
        return
    except ImportError:
        return  # not installed: tests that need timm skip themselves
    except RuntimeError as e:
        if "torchvision::nms" not in str(e):
            raise
    for name in [m for m in sys.modules if m == "torchvision" or m.startswith("torchvision.")]:
        del sys.modules[name]
    _TORCHVISION_LIB = torch.library.Library("torchvision", "DEF")
    _TORCHVISION_LIB.define("nms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    _TORCHVISION_LIB.define("qnms(Tensor dets, Tensor scores, float iou_threshold) -> Tensor")
    import torchvision  # noqa: F401


_import_torchvision_with_shim()


# Real-photo fixtures (real_images, broken_images) for the data tests.
pytest_plugins = ["tests.data.photos"]

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"
# Tests on the real Fashion-MNIST skip on a dev machine without Debian's package, but never in CI
# (CI=true), where scripts/setup.sh installs it: there a missing dataset must fail, not skip.
needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(FMNIST_ROOT) and not os.environ.get("CI"),
    reason="needs `apt-get install dataset-fashion-mnist`",
)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture
def seeded():
    """A fresh, test-specific seed: inputs are random every test but reproducible on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed
