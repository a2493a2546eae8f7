"""Builds the maws-kernels distribution (metadata in pyproject.toml) and, where it can, its CUDA
C++ extension ``maws_kernels._C``: the twins in ``csrc/`` (the ``"cuda"`` backend of
masked_patchify and norm_pix_loss).

The extension is built only when all of these hold, and otherwise skipped with one line on stderr
naming why, so that a CPU machine (or macOS / Windows) installs the pure-Python package without a
compiler:

* torch is importable while this file runs. pip's default build isolation runs it in a fresh
  environment WITHOUT torch, so on a GPU machine build with
  ``pip install --no-build-isolation ./kernels`` (or ``-e``, or ``python setup.py build_ext --inplace``
  in this folder);
* that torch is a CUDA build (``torch.version.cuda`` is not None);
* torch finds a CUDA toolkit with nvcc (``CUDA_HOME``, else nvcc on PATH, else /usr/local/cuda);
* the environment variable ``MAWS_KERNELS_NO_EXT`` is unset, empty or ``0``.

An in-place build (``--inplace``, and what an editable install runs) writes ``_C*.so`` next to the
Python sources, into ``maws_kernels/``; a regular install puts it into the installed package.

GPU architectures: sm_80 and sm_90 machine code, unless ``TORCH_CUDA_ARCH_LIST`` is set (then
torch picks). No ``--use_fast_math``: the loss kernels rely on IEEE sqrt and division.
"""
import os
import sys

from setuptools import setup

_HERE = os.path.dirname(os.path.abspath(__file__))
_EXT_SOURCES = ["csrc/bindings.cpp", "csrc/masked_patchify.cu", "csrc/norm_pix_loss.cu"]
_EXT_DEPENDS = ["csrc/maws_kernels.h", "csrc/common.cuh"]


def _cuda_extension() -> tuple[list, dict]:
    """(ext_modules, cmdclass) for ``maws_kernels._C``, or ([], {}) where it cannot be built."""

    def skip(why: str) -> tuple[list, dict]:
        print(f"maws_kernels: not building the CUDA extension maws_kernels._C: {why}", file=sys.stderr)
        return [], {}

    if os.environ.get("MAWS_KERNELS_NO_EXT", "") not in ("", "0"):
        return skip("MAWS_KERNELS_NO_EXT is set")
    try:
        import torch
        from torch.utils.cpp_extension import CUDA_HOME, BuildExtension, CUDAExtension
    except ImportError:
        return skip("torch is not importable here (pip build isolation? use --no-build-isolation)")
    if torch.version.cuda is None:
        return skip(f"torch {torch.__version__} is not a CUDA build")
    if CUDA_HOME is None or not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return skip(f"no CUDA toolkit with nvcc found (CUDA_HOME={CUDA_HOME})")

    nvcc = ["-O3", "-lineinfo"]  # -lineinfo: source lines in ncu / compute-sanitizer, no speed cost
    if not os.environ.get("TORCH_CUDA_ARCH_LIST"):
        # An explicit arch flag stops torch from adding its own (it would target only the local GPU).
        nvcc += ["-gencode=arch=compute_80,code=sm_80", "-gencode=arch=compute_90,code=sm_90"]
    # No -std here: torch adds the standard its own headers need (c++17 in older releases, c++20
    # in recent ones, 2.13 included); the csrc files are valid as both.
    ext = CUDAExtension(
        name="maws_kernels._C",
        sources=_EXT_SOURCES,
        depends=_EXT_DEPENDS,
        extra_compile_args={"cxx": ["-O3"], "nvcc": nvcc},
    )
    return [ext], {"build_ext": BuildExtension}


# setuptools resolves the relative source paths against the working directory: build from here
# whatever folder pip or a user started in.
os.chdir(_HERE)
ext_modules, cmdclass = _cuda_extension()
setup(ext_modules=ext_modules, cmdclass=cmdclass)
