"""Installs two packages from this repository.

* ``maws_fast``    -- the trainer (models, data, loop, CLI).
* ``maws_kernels`` -- the kernels in ``kernels/``; importable on its own (torch + triton only),
  so other trainers can depend on it without pulling in the trainer.

Plus, where it can be built, the extension ``maws_kernels._C``: the CUDA C++ twins in ``csrc/``
(the ``"cuda"`` backend). It is built only when all of these hold, and otherwise skipped with a
note on stderr, so that a CPU machine installs the pure-Python packages without a compiler:

* torch is importable while this file runs. pip's default build isolation runs it in a fresh
  environment WITHOUT torch, so on a GPU machine build with
  ``pip install --no-build-isolation -e .`` or ``python setup.py build_ext --inplace``;
* that torch is a CUDA build (``torch.version.cuda`` is not None);
* torch finds a CUDA toolkit with nvcc (``CUDA_HOME``, else nvcc on PATH, else /usr/local/cuda);
* the environment variable ``MAWS_KERNELS_NO_EXT`` is unset, empty or ``0``.

Both build routes put ``_C*.so`` next to the Python sources, in ``kernels/``: the extension is
named ``maws_kernels._C`` and ``package_dir`` maps ``maws_kernels`` to ``kernels``, and
setuptools' in-place build (``--inplace``, and what an editable install runs) writes an
extension into its package's directory as ``build_py.get_package_dir`` resolves it. A regular
``pip install .`` puts it into the installed ``maws_kernels`` package instead.

GPU architectures: sm_80 and sm_90 machine code, unless ``TORCH_CUDA_ARCH_LIST`` is set (then
torch picks). No ``--use_fast_math``: the loss kernels rely on IEEE sqrt and division.
"""
import os
import sys

from setuptools import find_packages, setup

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


ext_modules, cmdclass = _cuda_extension()

trainer_packages = [p for p in find_packages(include=["maws_fast", "maws_fast.*"])]

setup(
    name="maws_fast",
    version="0.1.0",
    description="Performance-engineered MAE -> WSP -> transfer trainer for Vision Transformers",
    python_requires=">=3.10",
    packages=trainer_packages + ["maws_kernels"],
    package_dir={"maws_kernels": "kernels"},
    install_requires=[
        # CI and the README pin the CPU builds through requirements/cpu.txt (torch 2.13.0,
        # triton 3.7.1); the ranges here only say what the code needs, so that a CUDA machine
        # keeps its own torch.
        "torch>=2.4",
        "triton>=3.0; platform_system == 'Linux'",
        "numpy>=1.24",
        "pyyaml>=6",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pillow>=9",  # JPEG encode/decode of the reference loader and maws-data
    ],
    extras_require={
        # The DALI input pipeline (maws_fast.data.dali); its CPU operators run without a GPU.
        "dali": ["nvidia-dali-cuda130"],
        # run.tensorboard=true mirrors metrics.jsonl to TensorBoard; `maws-bench plot` draws PNGs.
        "tensorboard": ["tensorboard"],
        "plot": ["matplotlib"],
        # test-only: timm is the parity reference for the ViT (it imports torchvision); the
        # scikit-learn / scikit-image wheels ship the real photographs the data tests decode.
        "dev": ["pytest>=8", "pytest-timeout>=2", "timm>=1.0", "scikit-learn", "scikit-image", "pillow",
                "nvidia-dali-cuda130", "tensorboard", "matplotlib"],
        # GPU-only: not installable or not useful on a CPU machine.
        "gpu": ["xformers", "nvidia-dali-cuda130"],
    },
    ext_modules=ext_modules,
    cmdclass=cmdclass,
    entry_points={
        "console_scripts": [
            "maws-train=maws_fast.cli:train_main",
            "maws-data=maws_fast.cli:data_main",
            "maws-bench=maws_fast.cli:bench_main",
            "maws-ckpt=maws_fast.cli:ckpt_main",
        ]
    },
)
