"""Installs the trainer, ``maws_fast`` (models, data, loop, CLIs), from this repository.

The kernels are a distribution of their own, ``maws-kernels`` (import name ``maws_kernels``),
in ``kernels/`` with its own ``pyproject.toml``: other trainers install it alone with
``pip install ./kernels``. The trainer requires exactly this version of it, which is not
published on a package index: install the two together from the checkout, ``pip install ./kernels
.`` (``scripts/setup.sh`` installs both in editable mode, kernels first). The CUDA C++ extension
``maws_kernels._C`` is built by ``kernels/setup.py`` (see there for when and how).
"""
from setuptools import find_packages, setup

KERNELS_REQUIREMENT = "maws-kernels==0.1.0"  # kernels/pyproject.toml's version (a test holds them equal)

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
        # checkout beside the trainer. By name and exact version, not by a file:// path: such a
        # path would be fixed at build time into the trainer's metadata (and break its sdist).
        KERNELS_REQUIREMENT,
        "numpy>=1.24",
        "pyyaml>=6",
        "safetensors>=0.4",
        "tqdm>=4.60",
        "pillow>=9",  # JPEG encode/decode of the reference loader and maws-data
        "tokenizers>=0.15",  # the LiT stage's caption BPE (HF tokenizers; a compiled wheel, no torch)
    ],
    extras_require={
        # The DALI input pipeline (maws_fast.data.dali); its CPU operators run without a GPU.
        "dali": ["nvidia-dali-cuda130"],
        # run.tensorboard=true mirrors metrics.jsonl to TensorBoard; `maws-bench plot` draws PNGs.
        "tensorboard": ["tensorboard"],
        "plot": ["matplotlib"],
        # MAWS's released CLIP checkpoints: their XLM-R text tower as HF transformers' XLMRobertaModel.
        "xlmr": ["transformers>=4.40"],
        # maws-bench kernels --providers liger: Liger-Kernel timed beside ours (its own deps: torch and triton).
        "liger": ["liger-kernel>=0.8.5"],
        # test-only: timm is the parity reference for the ViT (it imports torchvision); the
        # scikit-learn / scikit-image wheels ship the real photographs the data tests decode.
        "dev": ["pytest>=8", "pytest-timeout>=2", "timm>=1.0", "scikit-learn", "scikit-image", "pillow",
                "nvidia-dali-cuda130", "tensorboard", "matplotlib", "transformers>=4.40", "liger-kernel>=0.8.5"],
        # GPU-only: not installable or not useful on a CPU machine.
        "gpu": ["xformers", "nvidia-dali-cuda130"],
    },
    entry_points={
        "console_scripts": [
            "maws-train=maws_fast.cli.train:train_main",
            "maws-data=maws_fast.cli.data:data_main",
            "maws-bench=maws_fast.cli.bench:bench_main",
            "maws-ckpt=maws_fast.cli.ckpt:ckpt_main",
            "maws-doctor=maws_fast.cli.doctor:doctor_main",
        ]
    },
)
