"""Installs the trainer, ``maws_fast`` (models, data, loop, CLIs), from this repository.

The kernels are a distribution of their own, ``maws-kernels`` (import name ``maws_kernels``),
in ``kernels/`` with its own ``pyproject.toml``: other trainers install it alone with
``pip install ./kernels``. The trainer depends on it by path, so ``pip install .`` here installs
both; ``scripts/setup.sh`` installs both in editable mode. The CUDA C++ extension
``maws_kernels._C`` is built by ``kernels/setup.py`` (see there for when and how).
"""
import pathlib

from setuptools import find_packages, setup

_KERNELS_URI = (pathlib.Path(__file__).resolve().parent / "kernels").as_uri()

trainer_packages = [p for p in find_packages(include=["maws_fast", "maws_fast.*"])]

setup(
    name="maws_fast",
    version="0.1.0",
    description="Performance-engineered MAE -> WSP -> transfer trainer for Vision Transformers",
    python_requires=">=3.10",
    packages=trainer_packages,
    install_requires=[
        # CI and the README pin the CPU builds through requirements/cpu.txt (torch 2.13.0,
        # triton 3.7.1); the ranges here only say what the code needs, so that a CUDA machine
        # keeps its own torch.
        "torch>=2.4",
        # The kernels are their own distribution (kernels/pyproject.toml), installed from this
        # checkout by path: a bare name would be looked up on a package index, where this one is
        # not published (and another project's could answer).
        f"maws-kernels @ {_KERNELS_URI}",
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
    entry_points={
        "console_scripts": [
            "maws-train=maws_fast.cli:train_main",
            "maws-data=maws_fast.cli:data_main",
            "maws-bench=maws_fast.cli:bench_main",
            "maws-ckpt=maws_fast.cli:ckpt_main",
        ]
    },
)
