"""Test setup shared by every test.

* Triton's interpreter is the default only where CUDA is absent (:func:`triton_interpret_default`):
  without a GPU, ``TRITON_INTERPRET=1`` is set BEFORE any kernel module is imported, so Triton
  kernels run on CPU tensors; with one, the GPU tests run the compiled kernels (the tensor-core
  paths, the real autotuned configs) and the tests marked ``interpreter`` (Triton on CPU tensors)
  skip, saying why. A ``TRITON_INTERPRET`` already in the environment is kept either way.
* A torchvision shim (CPU torch only): the torchvision wheel on the package index is built for a
  CUDA torch and fails to import beside CPU torch 2.13 with "operator torchvision::nms does not
  exist". timm (the ViT parity reference) imports torchvision, so when that exact failure happens
  we define the ``nms`` / ``qnms`` schemas and import again. Nothing is patched on CUDA builds.
"""
import os
import sys

import pytest  # noqa: E402
import torch  # noqa: E402


def triton_interpret_default(environ, cuda_available: bool) -> str | None:
    """What ``TRITON_INTERPRET`` the test session runs with: the environment's own value when it has
    one, else "1" without CUDA and None (compiled Triton) with it."""
    if "TRITON_INTERPRET" in environ:
        return environ["TRITON_INTERPRET"]
    return None if cuda_available else "1"


# Decided before any kernel module is imported: triton.jit reads the variable when a kernel is defined.
_INTERPRET = triton_interpret_default(os.environ, torch.cuda.is_available())
if _INTERPRET is not None:
    os.environ["TRITON_INTERPRET"] = _INTERPRET
INTERPRETED = _INTERPRET == "1"

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

FMNIST_ROOT = "/usr/share/datasets/fashion-mnist"  # scripts/gpu_tier.sh links a carried copy here
# Tests on the real Fashion-MNIST skip on a dev machine without Debian's package, but never in CI
# (CI=true), where scripts/setup.sh installs it: there a missing dataset must fail, not skip.
needs_fmnist = pytest.mark.skipif(
    not os.path.isdir(FMNIST_ROOT) and not os.environ.get("CI"),
    reason="needs `apt-get install dataset-fashion-mnist`",
)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA device (skipped without one)")
    config.addinivalue_line("markers", "slow: takes more than a few seconds on 2 CPU cores")
    config.addinivalue_line("markers", "interpreter: runs Triton kernels on CPU tensors under TRITON_INTERPRET=1 "
                                       "(skipped where the session runs compiled Triton); gpu-marked tests of "
                                       "such a module still run")


def pytest_collection_modifyitems(config, items):
    no_gpu = pytest.mark.skip(reason="needs a CUDA device")
    no_interpreter = pytest.mark.skip(
        reason="runs Triton on CPU tensors, which needs TRITON_INTERPRET=1; this session runs compiled Triton "
               "(CUDA is present, or TRITON_INTERPRET was set otherwise): run it with TRITON_INTERPRET=1")
    cuda = torch.cuda.is_available()
    for item in items:
        if "gpu" in item.keywords:
            if not cuda:
                item.add_marker(no_gpu)
        elif "interpreter" in item.keywords and not INTERPRETED:
            item.add_marker(no_interpreter)


@pytest.fixture
def seeded():
    """A fresh, test-specific seed: inputs are random every test but reproducible on failure."""
    seed = int.from_bytes(os.urandom(4), "little")
    torch.manual_seed(seed)
    return seed
